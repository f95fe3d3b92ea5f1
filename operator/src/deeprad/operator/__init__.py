"""The Deep-Rad Kubernetes operator (imports as `deeprad.operator`).

`api/` is the typed CRD source; `decide/` holds pure decisions (site health and admission, a
study's next round), `render/` the manifests (site namespace and RBAC, rounds, Jobs), and
`hub.py` the thin kopf handlers; `cli.py` runs them as `deeprad operator --mode hub`.
"""
