"""The aggregator Job on a local store: bad updates are rejected and recorded, the round goes on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deeprad.aggregator.job import QuorumNotMet, run_aggregation_task
from deeprad.aggregator.strategies import make_strategy
from deeprad.core.checkpoint import read_checkpoint, sha256_bytes, to_bytes
from deeprad.core.errors import ConfigError
from deeprad.core.protocol import SecAggSpec, SecAggUpload, StrategySpec, UpdateManifest
from deeprad.core.secagg import (
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShare,
    SecAggAborted,
    SiteSession,
    SurvivorSet,
    threshold_for,
)
from deeprad.core.secagg import relay as relay_module
from deeprad.core.secagg.quantize import Quantizer, flatten, pack
from deeprad.core.secagg.relay import StoreRelay, round_config

G = {"w": torch.tensor([1.0, 2.0]), "k": torch.ones(2, 2)}


@pytest.fixture
def s(study: Any) -> Any:
    study.write_global(G)
    return study


def good(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([v, v]), "k": torch.zeros(2, 2)}


def test_fedavg_round_writes_checkpoint_and_report(s: Any) -> None:
    s.put_update("a", good(1.0), n=10)
    s.put_update("b", good(4.0), n=30)
    report = run_aggregation_task(s.task(), s.store)
    weights, manifest = read_checkpoint(s.store, s.layout, 1, hub=s.hub.public())
    torch.testing.assert_close(weights["w"], torch.tensor([4.25, 5.25]))
    assert [c.site for c in manifest.contributors] == ["a", "b"]
    assert manifest.parent_sha256 == read_checkpoint(s.store, s.layout, 0)[1].payload_sha256
    assert report.rejected == [] and report.checkpoint_sha256 == manifest.payload_sha256
    saved = json.loads(s.store.get_text(s.layout.aggregate(1)))
    assert saved["contributors"][1]["num_samples"] == 30


BAD: dict[str, Callable[..., str]] = {
    "names": lambda s: (s.put_update("bad", {"w": torch.zeros(2)}), "tensor names differ")[1],
    "shape": lambda s: (s.put_update("bad", {"w": torch.zeros(3), "k": torch.zeros(2, 2)}),
                        r"has shape \[3\]")[1],
    "dtype": lambda s: (s.put_update("bad", {"w": torch.zeros(2, dtype=torch.float64),
                                             "k": torch.zeros(2, 2)}), "has dtype F64")[1],
    "nan": lambda s: (s.put_update("bad", {"w": torch.tensor([float("nan"), 0.0]),
                                           "k": torch.zeros(2, 2)}), "NaN or Inf")[1],
    "inf": lambda s: (s.put_update("bad", {"w": torch.zeros(2),
                                           "k": torch.full((2, 2), float("inf"))}),
                      "NaN or Inf")[1],
    "digest": lambda s: (s.put_update("bad", good(1.0), statement={"payload_sha256": "0" * 64}),
                         "differs from the signed")[1],
    "stale-parent": lambda s: (s.put_update("bad", good(1.0),
                                            statement={"parent_sha256": "f" * 64}), "stale")[1],
    "wrong-study": lambda s: (s.put_update("bad", good(1.0), statement={"study": "other"}),
                              "belongs to study ns/other, not ns/study")[1],
    "zero-samples": lambda s: (s.put_update("bad", good(1.0), n=0), "num_samples must be")[1],
    "samples-differ-from-payload": lambda s: (
        s.put_update("bad", good(1.0), num_samples=1000),
        "manifest says num_samples 1000, the signed payload 10")[1],
    "malformed-manifest": lambda s: (s.store.put_text(s.layout.update_manifest(1, "bad"), "{}"),
                                     "manifest .* is malformed")[1],
    "missing-payload": lambda s: (s.put_update("bad", good(1.0)),
                                  s.store.delete(s.layout.update_payload(1, "bad")),
                                  "payload .* is missing")[2],
    "plaintext-upload": lambda s: (s.put_update("bad", good(1.0),
                                                envelope=to_bytes(good(1.0))), "bad magic")[1],
    "not-safetensors": lambda s: (s.put_update("bad", good(1.0), payload=b"garbage"),
                                  "not a readable safetensors")[1],
    "unsigned-manifest": lambda s: (s.store.put_text(
        s.layout.update_manifest(1, "bad"), UpdateManifest(
            namespace="ns", study="study", round=1, site="bad", nonce="0" * 32,
            parent_sha256=read_checkpoint(s.store, s.layout, 0)[1].payload_sha256,
            payload_sha256=sha256_bytes(b"x"), num_samples=1, producer="t").model_dump_json()),
        s.store.put_bytes(s.layout.update_payload(1, "bad"), b"x"), "unsigned")[2],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_update_is_rejected_and_recorded_round_goes_on(s: Any, case: str) -> None:
    s.put_update("good", good(2.0))
    reason = BAD[case](s)
    report = run_aggregation_task(s.task(), s.store)
    assert [c.site for c in report.contributors] == ["good"]
    assert len(report.rejected) == 1 and report.rejected[0].site == "bad"
    assert re.search(reason, report.rejected[0].reason), report.rejected[0].reason
    weights, _ = read_checkpoint(s.store, s.layout, 1)
    torch.testing.assert_close(weights["w"], torch.tensor([3.0, 4.0]))  # only "good" counted
    saved = json.loads(s.store.get_text(s.layout.aggregate(1)))
    assert saved["rejected"][0]["site"] == "bad"


def test_unadmitted_and_missing_sites_are_recorded(s: Any) -> None:
    s.put_update("a", good(1.0))
    s.put_update("intruder", good(100.0))
    report = run_aggregation_task(s.task(sites=["a", "b"]), s.store)
    assert [c.site for c in report.contributors] == ["a"]
    assert report.missing == ["b"]
    assert report.rejected[0].site == "intruder"
    assert "not admitted" in report.rejected[0].reason


def test_quorum_not_met_fails_with_reason(s: Any) -> None:
    s.put_update("a", good(1.0))
    s.put_update("b", {"w": torch.zeros(3), "k": torch.zeros(2, 2)})
    with pytest.raises(QuorumNotMet, match=r"1 valid update\(s\), minSites is 2.*b: tensor 'w'"):
        run_aggregation_task(s.task(min_sites=2), s.store)
    assert not s.store.exists(s.layout.global_manifest(1))


def test_rerun_is_idempotent(s: Any) -> None:
    s.put_update("a", good(1.0))
    first = run_aggregation_task(s.task(), s.store)
    s.put_update("late", good(50.0))  # arrives after the round was aggregated
    again = run_aggregation_task(s.task(), s.store)
    assert again == first


def test_rerun_after_a_crash_before_the_report_accepts_the_same_updates(s: Any) -> None:
    s.put_update("a", good(1.0))
    first = run_aggregation_task(s.task(), s.store)
    s.store.delete(s.layout.aggregate(1))  # the nonces were saved, the report was not
    again = run_aggregation_task(s.task(), s.store)
    assert again.rejected == [] and [c.site for c in again.contributors] == ["a"]
    assert again.checkpoint_sha256 == first.checkpoint_sha256


def test_robust_strategy_reads_updates_after_they_were_added(s: Any) -> None:
    for site, v in (("a", 1.0), ("b", 2.0), ("c", 90.0)):
        s.put_update(site, good(v))
    run_aggregation_task(s.task(strategy=StrategySpec(name="fedmedian")), s.store)
    weights, manifest = read_checkpoint(s.store, s.layout, 1)
    torch.testing.assert_close(weights["w"], torch.tensor([3.0, 4.0]))
    assert manifest.strategy == StrategySpec(name="fedmedian", params={})


def test_server_optimizer_state_travels_in_the_checkpoint(s: Any) -> None:
    s.put_update("a", good(1.0))
    spec = StrategySpec(name="fedadam", params={"server_lr": 0.1})
    run_aggregation_task(s.task(strategy=spec), s.store)
    _, manifest = read_checkpoint(s.store, s.layout, 1, hub=s.hub.public())
    assert manifest.strategy_state_sha256 is not None
    assert s.store.exists(s.layout.strategy_state(1))


def test_cli_entrypoint(s: Any, tmp_path: Path) -> None:
    s.put_update("a", good(1.0))
    (tmp_path / "task.json").write_text(s.task().model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "deeprad.aggregator", "--store",
                           str(s.store.root), "--task", f"@{tmp_path / 'task.json'}"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["contributors"][0]["site"] == "a"
    assert "PRIVATE" not in proc.stdout + proc.stderr
    for key in s.hub.private_files().values():
        assert key.strip() not in proc.stdout + proc.stderr
    bad = subprocess.run([sys.executable, "-m", "deeprad.aggregator", "--store",
                          str(s.store.root), "--task",
                          '{"namespace": "ns", "study": "study", "round": 0}'],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "invalid task" in bad.stderr and "round" in bad.stderr


def _secure_site(s: Any, site: str, delta: dict[str, torch.Tensor], n: int,
                 spec: SecAggSpec) -> None:
    """One site's side of secure aggregation, as the trainer runs it (without training)."""
    relay = StoreRelay(s.store, s.layout, 1, spec.timeout_s, spec.poll_s)
    vector, _ = flatten(delta)
    weight = n / spec.weight_normalizer
    x = Quantizer(spec.clip, max_sites=len(spec.roster)).encode(
        np.append(vector.astype(np.float64) * weight, weight))
    config = round_config("ns", "study", 1, spec, vector.size)
    session = SiteSession(config, s.sites[site], s.keys.registry)
    relay.post("advertise", session.advertise_keys(), site)
    relay.post("shares", session.share_keys(relay.wait_hub("advertised", list[AdvertiseKeys])),
               site)
    masked = session.masked_input(relay.wait_hub("routed", list[EncryptedShare], site), x)
    s.put_update(site, delta, n=n, payload=pack(masked), secagg=SecAggUpload(
        vector_length=config.vector_length, clip=spec.clip, max_sites=len(spec.roster)))
    relay.post("consistency", session.consistency_signature(
        relay.wait_hub("survivors", SurvivorSet)), site)
    relay.post("unmask", session.unmask(relay.wait_hub("confirmed",
                                                       list[ConsistencySignature])), site)


def test_secure_round_aggregates_the_weighted_mean_of_the_survivors(s: Any) -> None:
    # weighted values (n / 60) * delta stay inside the default clip of 1
    sites = {"a": (good(0.5), 10), "b": (good(1.0), 30), "c": (good(-0.5), 20)}
    spec = SecAggSpec(roster=sorted(sites), weight_normalizer=60.0, timeout_s=60.0, poll_s=0.01)
    threads = [threading.Thread(target=_secure_site, args=(s, site, delta, n, spec))
               for site, (delta, n) in sites.items()]
    for t in threads:
        t.start()
    report = run_aggregation_task(s.task(secagg=spec), s.store)
    for t in threads:
        t.join(timeout=60)
    assert report.secagg is not None and report.secagg.survivors == ["a", "b", "c"]
    assert sorted(c.site for c in report.contributors) == ["a", "b", "c"]
    assert report.rejected == [] and report.missing == []
    weights, manifest = read_checkpoint(s.store, s.layout, 1, hub=s.hub.public())
    mean = (10 * 0.5 + 30 * 1.0 - 20 * 0.5) / 60
    bound = report.secagg.quantization_bound
    torch.testing.assert_close(weights["w"], G["w"] + mean, rtol=0, atol=bound)
    torch.testing.assert_close(weights["k"], G["k"], rtol=0, atol=bound)
    assert manifest.secagg == report.secagg


def test_secure_round_refuses_a_strategy_that_needs_more_than_the_sum(s: Any) -> None:
    spec = SecAggSpec(roster=["a", "b"], weight_normalizer=20.0, timeout_s=1.0, poll_s=0.01)
    with pytest.raises(ConfigError, match=r"strategy krum needs every update in the clear"):
        run_aggregation_task(s.task(strategy=StrategySpec(name="krum"), secagg=spec), s.store)
    assert not s.store.exists(s.layout.global_manifest(1))
    # the sites are told at once, rather than waiting for the hub until their deadline
    assert "krum" in s.store.get_text(s.layout.secagg_message(1, "aborted"))


def _secure_round(s: Any, task: Any, sites: dict[str, tuple[dict[str, torch.Tensor], int]],
                  spec: SecAggSpec, silent: dict[str, str] | None = None) -> Any:
    """Run the hub's aggregation with every site of `sites` in a thread; a site in `silent`
    stops without a word after posting that step's message. Returns the report (or raises
    what the hub raised), once the sites' threads ended."""
    silent = silent or {}
    errors: dict[str, BaseException] = {}

    def site(name: str, delta: dict[str, torch.Tensor], n: int) -> None:
        try:
            if name in silent:
                _silent_site(s, name, delta, spec, silent[name])
            else:
                _secure_site(s, name, delta, n, spec)
        except Exception as exc:  # the hub's abort reaches a site as SecAggAborted
            errors[name] = exc

    threads = [threading.Thread(target=site, args=(name, delta, n))
               for name, (delta, n) in sites.items()]
    for t in threads:
        t.start()
    try:
        return run_aggregation_task(task, s.store)
    finally:
        for t in threads:
            t.join(timeout=60)


def _silent_site(s: Any, site: str, delta: dict[str, torch.Tensor], spec: SecAggSpec,
                 last: str) -> None:
    """A site that advertises its keys (and shares them, if `last` is "shares"), then dies."""
    relay = StoreRelay(s.store, s.layout, 1, spec.timeout_s, spec.poll_s)
    session = SiteSession(round_config("ns", "study", 1, spec, flatten(delta)[0].size),
                          s.sites[site], s.keys.registry)
    relay.post("advertise", session.advertise_keys(), site)
    if last == "shares":
        relay.post("shares", session.share_keys(relay.wait_hub("advertised",
                                                               list[AdvertiseKeys])), site)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_run_on_the_secure_mean(s: Any, name: str) -> None:
    sites = {"a": (good(0.5), 10), "b": (good(1.0), 30), "c": (good(-0.5), 20)}
    spec = SecAggSpec(roster=sorted(sites), weight_normalizer=60.0, timeout_s=60.0, poll_s=0.01)
    task = s.task(strategy=StrategySpec(name=name), secagg=spec)
    report = _secure_round(s, task, sites, spec)
    assert report.secagg is not None and report.secagg.survivors == ["a", "b", "c"]
    weights, manifest = read_checkpoint(s.store, s.layout, 1, hub=s.hub.public())
    assert manifest.strategy is not None and manifest.strategy.name == name
    # the same step as the strategy takes from the plain weighted mean of the updates
    expected = make_strategy(StrategySpec(name=name))
    expected.begin(G)
    for delta, n in sites.values():
        expected.add(delta, n)
    want, state = expected.finish()
    assert state  # server state (momentum, moments) travels to the next round
    for key in G:
        torch.testing.assert_close(weights[key], want[key], rtol=0, atol=1e-5)
    assert weights["w"][0] != G["w"][0]  # it moved


@pytest.mark.parametrize("last", ["advertise", "shares"])
def test_a_site_silent_after_advertising_costs_one_step_not_the_deadline(
        s: Any, last: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "MIN_STEP_S", 1.0)
    window = 60.0  # each later step: W / 20 = 3 s (the 10 s floor lowered for the test)
    sites = {"a": (good(0.5), 10), "b": (good(1.0), 30), "c": (good(-0.5), 20)}
    spec = SecAggSpec(roster=sorted(sites), weight_normalizer=60.0, timeout_s=window,
                      poll_s=0.01, threshold=threshold_for(3, "semi-honest"))
    start = time.monotonic()
    report = _secure_round(s, s.task(secagg=spec), sites, spec, silent={"c": last})
    took = time.monotonic() - start
    assert report.secagg is not None and report.secagg.survivors == ["a", "b"]
    assert (report.secagg.dropped if last == "shares" else report.secagg.not_joined) == ["c"]
    assert took < window / 3, took  # a step or two, not the window
    weights, _ = read_checkpoint(s.store, s.layout, 1)
    mean = (10 * 0.5 + 30 * 1.0) / 40  # the survivors' weighted mean: c's masks removed
    torch.testing.assert_close(weights["w"], G["w"] + mean, rtol=0,
                               atol=report.secagg.quantization_bound)


def test_a_secure_round_below_its_quorum_stops_before_anything_is_unmasked(
        s: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "MIN_STEP_S", 1.0)
    sites = {"a": (good(0.5), 10), "b": (good(1.0), 30), "c": (good(-0.5), 20)}
    spec = SecAggSpec(roster=sorted(sites), weight_normalizer=60.0, timeout_s=60.0,
                      poll_s=0.01, threshold=2)
    with pytest.raises(SecAggAborted, match=r"2 of 3 site\(s\) sent a valid masked update, "
                                            r"minSites is 3 \(missing: c\)"):
        _secure_round(s, s.task(secagg=spec, min_sites=3), sites, spec, silent={"c": "shares"})
    assert not s.store.list(s.layout.secagg_prefix(1) + "unmask/")  # no share revealed
    assert not s.store.exists(s.layout.global_manifest(1))


def test_strategy_parameters_out_of_range_are_refused_before_anything_is_read(s: Any) -> None:
    with pytest.raises(ConfigError, match=r"strategy krum: byzantine must be an integer >= 0, "
                                          r"got -3"):
        run_aggregation_task(s.task(strategy=StrategySpec(name="krum",
                                                          params={"byzantine": -3})), s.store)
