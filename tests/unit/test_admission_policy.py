"""The site-Lease admission policy has one source (operator/render/admission.py), written into
the hub chart's files (tests/unit/test_charts.py checks the chart ships it), and it allows
exactly what the site agent writes when it renews its Lease. Its refusals on a real API server
are in tests/integration/test_hub_rbac.py."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from deeprad.operator.api.hospitalsite import GpuCapacity
from deeprad.operator.api.names import site_namespace
from deeprad.operator.render import admission
from deeprad.operator.render.site import AGENT, lease, service_account
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.decide import renew_lease


def test_generated_file_is_current() -> None:
    assert admission.main(["--check"]) == 0, "run `make admission`"


def _changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    """Dotted paths (metadata.annotations.<key>, spec.<field>, metadata.<field>) that differ."""
    out = set()
    for part in ("metadata", "spec"):
        old, new = before.get(part) or {}, after.get(part) or {}
        for key in set(old) | set(new):
            if key == "annotations":
                a, b = old.get(key) or {}, new.get(key) or {}
                out |= {f"metadata.annotations.{k}" for k in set(a) | set(b)
                        if a.get(k) != b.get(k)}
            elif old.get(key) != new.get(key):
                out.add(f"{part}.{key}")
    return out


def test_policy_allows_exactly_what_renew_lease_writes() -> None:
    hub_lease = lease("st-marys", "uid-1")
    allowed = ({f"spec.{f}" for f in admission.SITE_LEASE_SPEC_FIELDS}
               | {f"metadata.annotations.{a}" for a in admission.SITE_LEASE_ANNOTATIONS})
    config = AgentConfig(site="st-marys")
    first = renew_lease(config, hub_lease, GpuCapacity(allocatable=2), datetime.now(UTC))
    assert first is not None
    assert _changed(hub_lease, first.lease) == allowed  # every allowed field is used
    again = renew_lease(config, first.lease, None, datetime.now(UTC))
    assert again is not None
    assert _changed(first.lease, again.lease) <= allowed
    assert first.lease["spec"]["holderIdentity"] == "st-marys-agent"  # the holder rule's name
    assert not set(admission.SITE_LEASE_SPEC_FIELDS) & set(admission.LEASE_SPEC_GUARDED)


def test_policy_matches_the_site_agents_identity_only() -> None:
    pattern = re.compile(admission.SITE_AGENT_USERNAME)
    sa = service_account("st-marys", "uid-1")["metadata"]
    assert sa["name"] == AGENT and sa["namespace"] == site_namespace("st-marys")
    assert pattern.match(f"system:serviceaccount:{sa['namespace']}:{sa['name']}")
    for other in ("system:serviceaccount:deeprad-system:deeprad",  # the hub operator
                  "system:serviceaccount:deeprad-site-st-marys:default",
                  "system:serviceaccount:kube-system:deeprad-agent",
                  "system:serviceaccount:deeprad-site-a:deeprad-agent:x", "admin"):
        assert not pattern.match(other), other


def test_every_refusal_names_its_rule() -> None:
    spec = admission.site_lease_policy()["spec"]
    for rule in spec["validations"]:
        assert re.match(rf"{admission.SITE_LEASE_POLICY} \([A-Za-z]+\): ", rule["message"])
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"][0]["resources"] == ["leases"]
