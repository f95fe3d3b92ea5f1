"""The operator's *render* layer: manifests built from typed inputs, no I/O, golden-tested.

- `site`: a HospitalSite's hub namespace, its agent's ServiceAccount, Role, RoleBinding and
  heartbeat Lease;
- `rounds`: the FederatedRound a study creates;
- `jobs`: the trainer and aggregator Jobs (the one place that builds Job manifests).
"""
