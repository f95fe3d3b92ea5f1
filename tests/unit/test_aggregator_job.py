"""The aggregator Job on a local store: bad updates are rejected and recorded, the round goes on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deeprad.aggregator.job import QuorumNotMet, run_aggregation_task
from deeprad.core.checkpoint import (
    read_checkpoint,
    sha256_bytes,
    to_bytes,
    write_checkpoint,
    write_update,
)
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregationTask, ModelSpec, StrategySpec, UpdateManifest
from deeprad.core.store.local import LocalStore

LAYOUT = StudyLayout("ns", "study")
G = {"w": torch.tensor([1.0, 2.0]), "k": torch.ones(2, 2)}


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    s = LocalStore(tmp_path)
    write_checkpoint(s, LAYOUT, {"study": "study", "round": 0, "producer": "test",
                                 "model": ModelSpec(), "parent_sha256": None}, G)
    return s


def put_update(store: LocalStore, site: str, delta: dict[str, torch.Tensor], n: int = 10,
               **overrides: object) -> UpdateManifest:
    payload = to_bytes(delta)
    _, parent = read_checkpoint(store, LAYOUT, 0)
    fields: dict[str, object] = {"study": "study", "round": 1, "site": site, "nonce": site,
                                 "parent_sha256": parent.payload_sha256,
                                 "payload_sha256": sha256_bytes(payload), "num_samples": n,
                                 "producer": "test"}
    fields.update(overrides)
    m = UpdateManifest.model_validate(fields)
    write_update(store, LAYOUT, m, payload)
    return m


def good(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([v, v]), "k": torch.zeros(2, 2)}


def task(**kw: object) -> AggregationTask:
    return AggregationTask.model_validate({"namespace": "ns", "study": "study", "round": 1, **kw})


def test_fedavg_round_writes_checkpoint_and_report(store: LocalStore) -> None:
    put_update(store, "a", good(1.0), n=10)
    put_update(store, "b", good(4.0), n=30)
    report = run_aggregation_task(task(), store)
    weights, manifest = read_checkpoint(store, LAYOUT, 1)
    torch.testing.assert_close(weights["w"], torch.tensor([4.25, 5.25]))
    assert [c.site for c in manifest.contributors] == ["a", "b"]
    assert manifest.parent_sha256 == read_checkpoint(store, LAYOUT, 0)[1].payload_sha256
    assert report.rejected == [] and report.checkpoint_sha256 == manifest.payload_sha256
    saved = json.loads(store.get_text(LAYOUT.aggregate(1)))
    assert saved["contributors"][1]["num_samples"] == 30


BAD: dict[str, Callable[[LocalStore], str]] = {
    "names": lambda s: (put_update(s, "bad", {"w": torch.zeros(2)}), "tensor names differ")[1],
    "shape": lambda s: (put_update(s, "bad", {"w": torch.zeros(3), "k": torch.zeros(2, 2)}),
                        r"has shape \[3\]")[1],
    "dtype": lambda s: (put_update(s, "bad", {"w": torch.zeros(2, dtype=torch.float64),
                                              "k": torch.zeros(2, 2)}), "has dtype F64")[1],
    "nan": lambda s: (put_update(s, "bad", {"w": torch.tensor([float("nan"), 0.0]),
                                            "k": torch.zeros(2, 2)}), "NaN or Inf")[1],
    "inf": lambda s: (put_update(s, "bad", {"w": torch.zeros(2),
                                            "k": torch.full((2, 2), float("inf"))}),
                      "NaN or Inf")[1],
    "digest": lambda s: (put_update(s, "bad", good(1.0), payload_sha256="0" * 64),
                         "does not match its manifest")[1],
    "stale-parent": lambda s: (put_update(s, "bad", good(1.0), parent_sha256="f" * 64),
                               "stale")[1],
    "wrong-round": lambda s: (put_update(s, "bad", good(1.0), round=1, study="other"),
                              "not 'study' round 1")[1],
    "zero-samples": lambda s: (put_update(s, "bad", good(1.0), n=0), "num_samples must be")[1],
    "malformed-manifest": lambda s: (s.put_text(LAYOUT.update_manifest(1, "bad"), "{}"),
                                     "manifest .* is malformed")[1],
    "missing-payload": lambda s: (put_update(s, "bad", good(1.0)),
                                  s.delete(LAYOUT.update_payload(1, "bad")),
                                  "payload .* is missing")[2],
    "not-safetensors": lambda s: (s.put_bytes(LAYOUT.update_payload(1, "bad"), b"garbage"),
                                  s.put_text(LAYOUT.update_manifest(1, "bad"), UpdateManifest(
                                      study="study", round=1, site="bad", nonce="n",
                                      parent_sha256=read_checkpoint(s, LAYOUT, 0)[1].payload_sha256,
                                      payload_sha256=sha256_bytes(b"garbage"), num_samples=1,
                                      producer="t").model_dump_json()),
                                  "not a readable safetensors")[2],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_update_is_rejected_and_recorded_round_goes_on(store: LocalStore, case: str) -> None:
    put_update(store, "good", good(2.0))
    reason = BAD[case](store)
    report = run_aggregation_task(task(), store)
    assert [c.site for c in report.contributors] == ["good"]
    assert len(report.rejected) == 1 and report.rejected[0].site == "bad"
    assert re.search(reason, report.rejected[0].reason), report.rejected[0].reason
    weights, _ = read_checkpoint(store, LAYOUT, 1)
    torch.testing.assert_close(weights["w"], torch.tensor([3.0, 4.0]))  # only "good" counted


def test_unadmitted_and_missing_sites_are_recorded(store: LocalStore) -> None:
    put_update(store, "a", good(1.0))
    put_update(store, "intruder", good(100.0))
    report = run_aggregation_task(task(sites=["a", "b"]), store)
    assert [c.site for c in report.contributors] == ["a"]
    assert report.missing == ["b"]
    assert report.rejected[0].site == "intruder"
    assert "not admitted" in report.rejected[0].reason


def test_quorum_not_met_fails_with_reason(store: LocalStore) -> None:
    put_update(store, "a", good(1.0))
    put_update(store, "b", {"w": torch.zeros(3), "k": torch.zeros(2, 2)})
    with pytest.raises(QuorumNotMet, match=r"1 valid update\(s\), minSites is 2.*b: tensor 'w'"):
        run_aggregation_task(task(min_sites=2), store)
    assert not store.exists(LAYOUT.global_manifest(1))


def test_rerun_is_idempotent(store: LocalStore) -> None:
    put_update(store, "a", good(1.0))
    first = run_aggregation_task(task(), store)
    put_update(store, "late", good(50.0))  # arrives after the round was aggregated
    again = run_aggregation_task(task(), store)
    assert again == first


def test_robust_strategy_reads_updates_after_they_were_added(store: LocalStore) -> None:
    for site, v in (("a", 1.0), ("b", 2.0), ("c", 90.0)):
        put_update(store, site, good(v))
    run_aggregation_task(task(strategy=StrategySpec(name="fedmedian")), store)
    weights, manifest = read_checkpoint(store, LAYOUT, 1)
    torch.testing.assert_close(weights["w"], torch.tensor([3.0, 4.0]))
    assert manifest.strategy == StrategySpec(name="fedmedian", params={})


def test_server_optimizer_state_travels_in_the_checkpoint(store: LocalStore) -> None:
    put_update(store, "a", good(1.0))
    spec = StrategySpec(name="fedadam", params={"server_lr": 0.1})
    run_aggregation_task(task(strategy=spec), store)
    _, manifest = read_checkpoint(store, LAYOUT, 1)
    assert manifest.strategy_state_sha256 is not None
    assert store.exists(LAYOUT.strategy_state(1))


def test_cli_entrypoint(store: LocalStore, tmp_path: Path) -> None:
    put_update(store, "a", good(1.0))
    (tmp_path / "task.json").write_text(task().model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "deeprad.aggregator", "--store", str(store.root),
                           "--task", f"@{tmp_path / 'task.json'}"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["contributors"][0]["site"] == "a"
    bad = subprocess.run([sys.executable, "-m", "deeprad.aggregator", "--store", str(store.root),
                          "--task", '{"namespace": "ns", "study": "study", "round": 0}'],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "invalid task" in bad.stderr and "round" in bad.stderr
