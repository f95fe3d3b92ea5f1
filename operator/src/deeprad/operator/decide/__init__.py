"""The operator's *decide* layer: pure functions from (spec, observed state) to what should
be, with no I/O. Each module is unit-tested with plain data:

- `conditions`: metav1.Condition-shaped set and merge helpers;
- `sites`: a HospitalSite's reachability, readiness and admission to a round;
- `study`: a FederatedStudy's next step (create round N, wait, or stop) and its status.
"""
