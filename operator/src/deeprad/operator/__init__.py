"""The Deep-Rad Kubernetes operator (imports as `deeprad.operator`; needs no torch).

`api/` is the typed CRD source; `decide/` holds pure decisions (site health and admission, a
study's next round, a round's phases), `render/` the manifests (site namespace and RBAC, rounds,
Jobs), `hub/` the thin kopf handlers, one module per resource, and the round's act layer;
`site/` the hospital's agent (observe, decide, act). `python -m deeprad.operator --mode hub|site`
runs either (`cli.py`).
"""
