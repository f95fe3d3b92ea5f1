"""A push lab's agent runs inside the hub: unless its agent.yaml names a store, the store its
trainers may reach is the hub's own (where the hub's presigned URLs lead)."""

from __future__ import annotations

from pathlib import Path

import yaml

from deeprad.operator.api.hospitalsite import HospitalSiteSpec
from deeprad.operator.hub.push import agent_config

ROOT = Path(__file__).resolve().parents[2]
HUB_STORE = "http://127.0.0.1:9000"


def _spec() -> HospitalSiteSpec:
    example = yaml.safe_load((ROOT / "examples" / "hospitalsite-charite.yaml").read_text())
    return HospitalSiteSpec.model_validate(example["spec"])


def test_without_agent_yaml_the_lab_may_reach_the_hubs_store() -> None:
    assert agent_config("lab", _spec(), None, HUB_STORE).store.endpoint == HUB_STORE


def test_agent_yaml_without_a_store_gets_the_hubs_store() -> None:
    text = yaml.safe_dump({"training": {"namespace": "lab-training"}})
    config = agent_config("lab", _spec(), text, HUB_STORE)
    assert config.store.endpoint == HUB_STORE
    assert config.training.namespace == "lab-training"


def test_a_store_named_in_agent_yaml_wins() -> None:
    text = yaml.safe_dump({"store": {"endpoint": "https://minio.lab.example.org"}})
    config = agent_config("lab", _spec(), text, HUB_STORE)
    assert config.store.endpoint == "https://minio.lab.example.org"


def test_a_hub_without_rounds_configured_leaves_the_store_unset() -> None:
    assert agent_config("lab", _spec(), None, None).store.endpoint is None
