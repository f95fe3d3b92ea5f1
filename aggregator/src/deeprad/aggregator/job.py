"""The aggregator Job: verify, decrypt and check each site's update, fold it into the round's
strategy (or unmask the secure-aggregation sum), then write, sign and record the next global
checkpoint. Bad updates are rejected and recorded; the round goes on.

`run_aggregation_task` is what `python -m deeprad.aggregator` runs in the hub and what
`deeprad simulate` runs after each round.

Trust. An update is accepted only if the registered site signed (namespace, study, round, site,
nonce, parent digest, sha256 of the stored envelope), the nonce was never accepted before in the
study, and the envelope opens with the hub's key under AES-GCM bound to (namespace, study,
round, site). The decrypted plaintext is not hashed again: the signature covers the envelope
and AES-GCM authenticates every chunk of it, so the plaintext is exactly what the site sealed.
The sample count inside the signed payload must equal the manifest's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from deeprad.aggregator.strategies import Strategy, make_strategy
from deeprad.core import __version__
from deeprad.core.checkpoint import (
    NUM_SAMPLES_KEY,
    TensorFile,
    UpdateReader,
    open_checkpoint,
    read_strategy_state,
    sha256_file,
    validate_update,
    write_checkpoint,
)
from deeprad.core.envelope import EnvelopeContext, open_envelope, open_file
from deeprad.core.errors import ConfigError, DeepRadError, ObjectNotFound, UpdateRejected
from deeprad.core.identity import Identity, KeyRegistry, load_job_identity
from deeprad.core.layout import StudyLayout
from deeprad.core.metrics import combine
from deeprad.core.protocol import (
    AggregateReport,
    AggregationTask,
    CheckpointManifest,
    Contribution,
    Rejection,
    SecAggOutcome,
    SecAggSpec,
    SiteResult,
    StrategySpec,
    UpdateManifest,
)
from deeprad.core.secagg import (
    AdvertiseKeys,
    ConsistencySignature,
    HubSession,
    SecAggError,
    ShareKeys,
    UnmaskingShares,
)
from deeprad.core.secagg.quantize import (
    Quantizer,
    VectorLayout,
    unflatten,
    unpack,
)
from deeprad.core.secagg.relay import StoreRelay, round_config
from deeprad.core.signing import ReplayGuard, parse_statement, verify_update
from deeprad.core.store import ObjectStore

log = logging.getLogger("deeprad.aggregator")


class QuorumNotMet(DeepRadError):
    """Fewer valid updates than the round's minSites."""


# ---- replay protection across rounds ----------------------------------------------------------


def _load_nonces(store: ObjectStore, layout: StudyLayout) -> dict[str, int]:
    """nonce -> round that accepted it."""
    try:
        data = json.loads(store.get_bytes(layout.seen_nonces()))
    except ObjectNotFound:
        return {}
    except ValueError as exc:
        raise ConfigError(f"{layout.seen_nonces()} is corrupt ({exc}); restore it from a "
                          "backup: without it replayed updates cannot be refused") from None
    return {str(k): int(v) for k, v in data.items()}


def _save_nonces(store: ObjectStore, layout: StudyLayout, seen: dict[str, int]) -> None:
    store.put_text(layout.seen_nonces(), json.dumps(seen, sort_keys=True, indent=0))


# ---- one update -------------------------------------------------------------------------------


def _read_update_manifest(store: ObjectStore, layout: StudyLayout, round_no: int,
                          site: str) -> UpdateManifest:
    key = layout.update_manifest(round_no, site)
    try:
        m = UpdateManifest.model_validate_json(store.get_bytes(key))
    except ObjectNotFound:
        raise UpdateRejected(site, f"manifest {key} is missing") from None
    except ValidationError as exc:
        raise UpdateRejected(site, f"manifest {key} is malformed: "
                                   f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
                             ) from None
    if m.num_samples < 1:
        raise UpdateRejected(site, f"num_samples must be >= 1, got {m.num_samples}")
    return m


class _Verifier:
    """Checks signatures, nonces and envelopes of one round's updates."""

    def __init__(self, store: ObjectStore, layout: StudyLayout, task: AggregationTask,
                 parent: CheckpointManifest, hub: Identity, registry: KeyRegistry,
                 replay: ReplayGuard) -> None:
        self.store, self.layout, self.task, self.parent = store, layout, task, parent
        self.hub, self.registry, self.replay = hub, registry, replay

    @contextlib.contextmanager
    def envelope(self, site: str) -> Iterator[tuple[UpdateManifest, Path]]:
        """The verified manifest and a local copy of the envelope, or UpdateRejected."""
        manifest = _read_update_manifest(self.store, self.layout, self.task.round, site)
        statement = parse_statement(site, {
            "kind": "update", "namespace": manifest.namespace, "study": manifest.study,
            "round": manifest.round, "site": manifest.site, "nonce": manifest.nonce,
            "parent_sha256": manifest.parent_sha256, "payload_sha256": manifest.payload_sha256})
        key = self.layout.update_payload(self.task.round, site)
        with contextlib.ExitStack() as stack:
            try:
                path = stack.enter_context(self.store.local_copy(key))
            except ObjectNotFound:
                raise UpdateRejected(site, f"payload {key} is missing") from None
            assert self.parent.payload_sha256 is not None
            verify_update(statement, manifest.signature, self.registry, site=site,
                          namespace=self.task.namespace, study=self.task.study,
                          round_no=self.task.round, parent_sha256=self.parent.payload_sha256,
                          payload_sha256=sha256_file(path), replay=self.replay)
            yield manifest, path

    def context(self, site: str) -> EnvelopeContext:
        return EnvelopeContext(self.task.namespace, self.task.study, self.task.round, site)


def _take_plain(verifier: _Verifier, site: str, strategy: Strategy, reader: UpdateReader | None,
                reference: dict[str, tuple[str, tuple[int, ...]]], workdir: Path,
                keep: contextlib.ExitStack) -> Contribution:
    """Verify, decrypt (streaming, to a private temporary file) and fold in one update."""
    with contextlib.ExitStack() as one:
        manifest, envelope = one.enter_context(verifier.envelope(site))
        plain = workdir / f"{site}.safetensors"
        open_file(verifier.hub, verifier.context(site), envelope, plain)
        one.callback(plain.unlink, missing_ok=True)
        update: Mapping[str, torch.Tensor]
        if reader is not None:
            update = one.enter_context(reader.open(site, plain, None))
            metadata = update.metadata  # type: ignore[attr-defined]
        else:
            try:
                update = TensorFile(plain)
            except DeepRadError as exc:
                raise UpdateRejected(site, str(exc)) from exc
            metadata = update.metadata
        if metadata.get(NUM_SAMPLES_KEY) != str(manifest.num_samples):
            raise UpdateRejected(site, f"manifest says num_samples {manifest.num_samples}, the "
                                       f"signed payload {metadata.get(NUM_SAMPLES_KEY)}")
        validate_update(site, update, reference)
        strategy.add(update, manifest.num_samples)
        if not strategy.streaming:  # it reads the update again in finish(): keep it open
            keep.enter_context(one.pop_all())
    return Contribution(site=site, update_sha256=manifest.payload_sha256,
                        num_samples=manifest.num_samples)


# ---- secure aggregation -----------------------------------------------------------------------


def _secure_mean(verifier: _Verifier, spec: SecAggSpec, sites: list[str],
                 global_weights: Mapping[str, torch.Tensor],
                 rejected: list[Rejection]) -> tuple[dict[str, torch.Tensor], list[Contribution],
                                                     SecAggOutcome]:
    """Run the hub's side of secure aggregation over the store; returns the sample-weighted
    mean delta of the survivors, their contributions and what happened."""
    task = verifier.task
    if task.strategy.name != "fedavg":
        raise ConfigError(f"secure aggregation supports the fedavg strategy only, not "
                          f"{task.strategy.name!r}: the hub sees only the sum")
    vlayout = VectorLayout.of(global_weights)
    config = round_config(task.namespace, task.study, task.round, spec, vlayout.size)
    if sorted(sites) != list(config.roster):
        raise ConfigError(f"secure aggregation roster {list(config.roster)} differs from the "
                          f"round's admitted sites {sorted(sites)}")
    quantizer = Quantizer(spec.clip, max_sites=len(config.roster))
    relay = StoreRelay(verifier.store, verifier.layout, task.round, spec.timeout_s, spec.poll_s)
    session = HubSession(config, verifier.hub, verifier.registry)
    try:
        ads, bad = relay.collect("advertise", AdvertiseKeys, config.roster)
        session.rejected.update(bad)
        relay.post("advertised", session.collect_advertisements(ads))
        shares, bad = relay.collect("shares", ShareKeys, [a.site for a in ads])
        session.rejected.update(bad)
        for site, routed in session.route_shares(shares).items():
            relay.post("routed", routed, site)
        u2 = [s for s in config.roster if relay.store.exists(
            relay.layout.secagg_message(task.round, "routed", s))]
        _wait_for_updates(verifier, u2, spec)
        contributions: dict[str, Contribution] = {}
        for site in u2:
            try:
                with verifier.envelope(site) as (manifest, path):
                    if manifest.secagg is None or (manifest.secagg.vector_length,
                                                   manifest.secagg.max_sites) != (
                            config.vector_length, len(config.roster)) \
                            or manifest.secagg.clip != spec.clip:
                        raise UpdateRejected(site, "masked upload's encoding differs from the "
                                                   "round's secure-aggregation config")
                    data = open_envelope(verifier.hub, verifier.context(site), path.read_bytes())
                    session.add_masked_input(site, unpack(data, config.vector_length))
                contributions[site] = Contribution(site=site,
                                                   update_sha256=manifest.payload_sha256,
                                                   num_samples=manifest.num_samples)
            except (UpdateRejected, SecAggError) as exc:
                reason = exc.reason if isinstance(exc, UpdateRejected) else str(exc)
                log.warning("round %s: site %s: %s", task.round, site, reason)
                rejected.append(Rejection(site=site, reason=reason))
        survivors = session.survivor_set()
        relay.post("survivors", survivors)
        signatures, bad = relay.collect("consistency", ConsistencySignature,
                                        survivors.survivors)
        session.rejected.update(bad)
        relay.post("confirmed", session.collect_consistency(signatures))
        unmasking, bad = relay.collect("unmask", UnmaskingShares, survivors.survivors)
        session.rejected.update(bad)
        result = session.reconstruct(unmasking)
    except BaseException as exc:
        relay.abort(f"{type(exc).__name__}: {exc}")
        raise
    rejected.extend(Rejection(site=s, reason=f"secure aggregation: {r}")
                    for s, r in sorted(result.rejected.items())
                    if s not in {x.site for x in rejected})
    total = quantizer.decode_sum(result.sum, len(result.survivors)).astype(np.float64)
    weight = float(total[-1])
    bound = quantizer.error_bound(len(result.survivors))
    if not weight > bound:
        raise ConfigError(f"secure aggregation round {task.round}: the survivors' total weight "
                          f"{weight:g} is not above the quantization error {bound:g}")
    mean = total[:-1] / weight
    # |(S + e) / (W + e') - S / W| <= e (1 + |S / W|) / (W - e)
    mean_bound = bound * (1 + float(np.abs(mean).max(initial=0.0))) / (weight - bound)
    outcome = SecAggOutcome(survivors=list(result.survivors), dropped=list(result.dropped),
                            not_joined=list(result.not_joined), threshold=config.threshold,
                            clip=spec.clip, quantization_bound=mean_bound)
    tensors = unflatten(mean.astype(np.float32), vlayout)
    return tensors, [contributions[s] for s in result.survivors], outcome


def _wait_for_updates(verifier: _Verifier, sites: list[str], spec: SecAggSpec) -> None:
    """Wait until each site of `sites` uploaded its masked update, or the step's deadline."""
    deadline = time.monotonic() + spec.timeout_s
    keys = [verifier.layout.update_manifest(verifier.task.round, s) for s in sites]
    while not all(verifier.store.exists(k) for k in keys) and time.monotonic() < deadline:
        time.sleep(spec.poll_s)


# ---- the job ----------------------------------------------------------------------------------


def _site_result(store: ObjectStore, layout: StudyLayout, round_no: int,
                 site: str) -> SiteResult | None:
    try:
        return SiteResult.model_validate_json(store.get_bytes(layout.result(round_no, site)))
    except (ObjectNotFound, ValidationError):
        return None


def run_aggregation_task(task: AggregationTask, store: ObjectStore) -> AggregateReport:
    """Aggregate round `task.round`'s updates into the round's global checkpoint."""
    start = time.perf_counter()
    layout = StudyLayout(task.namespace, task.study)
    with contextlib.suppress(ObjectNotFound, ValidationError):  # already done: idempotent
        return AggregateReport.model_validate_json(store.get_bytes(layout.aggregate(task.round)))
    hub = load_job_identity(task.identity_dir, "hub")
    registry = KeyRegistry.from_json(task.registry_json)
    if registry.require_hub().signing_key != hub.public().signing_key:
        raise ConfigError(f"the hub key folder holds {hub.name}'s keys, which are not the "
                          "registry's hub keys; mount the hub's identity")
    strategy = make_strategy(task.strategy)
    spec = StrategySpec(name=strategy.name, params=strategy.params())
    if task.secagg is not None:
        present = sorted(task.sites or task.secagg.roster)
    else:
        present = layout.sites_with_updates(store.list(layout.updates_prefix(task.round)),
                                            task.round)
    expected = task.sites if task.sites is not None else present
    missing = [s for s in expected if s not in present]
    rejected = [Rejection(site=s, reason="site was not admitted to this round")
                for s in present if s not in expected]
    contributors: list[Contribution] = []
    seen = _load_nonces(store, layout)
    # Nonces this round accepted in an attempt that did not finish may come again: idempotent.
    replay = ReplayGuard(n for n, r in seen.items() if r != task.round)
    outcome: SecAggOutcome | None = None
    with contextlib.ExitStack() as keep, open_checkpoint(
        store, layout, task.round - 1, hub=registry.require_hub()
    ) as (global_weights, parent):
        state = (read_strategy_state(store, layout, parent)
                 if parent.strategy and parent.strategy.name == strategy.name else None)
        strategy.begin(global_weights, state)
        reference = global_weights.signature()
        verifier = _Verifier(store, layout, task, parent, hub, registry, replay)
        if task.secagg is not None:
            mean, contributors, outcome = _secure_mean(
                verifier, task.secagg, [s for s in expected if s in present],
                global_weights.load_all(), rejected)
            validate_update("secure aggregate", mean, reference)
            strategy.add(mean, 1)
        else:
            reader = UpdateReader() if strategy.streaming else None
            workdir = Path(keep.enter_context(tempfile.TemporaryDirectory(
                prefix="deeprad-aggregate-")))
            for site in [s for s in expected if s in present]:
                try:
                    contributors.append(_take_plain(verifier, site, strategy, reader,
                                                    reference, workdir, keep))
                except UpdateRejected as exc:
                    log.warning("round %s: %s", task.round, exc)
                    rejected.append(Rejection(site=site, reason=exc.reason))
        if len(contributors) < task.min_sites:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in rejected) or "none rejected"
            raise QuorumNotMet(
                f"study {task.study} round {task.round}: {len(contributors)} valid update(s), "
                f"minSites is {task.min_sites} (missing: {missing or 'none'}; {reasons})"
            )
        new_weights, new_state = strategy.finish()
        checkpoint = write_checkpoint(
            store, layout,
            {"study": task.study, "round": task.round,
             "producer": f"deeprad-aggregator/{__version__}", "model": parent.model,
             "parent_sha256": parent.payload_sha256, "strategy": spec,
             "contributors": contributors, "secagg": outcome,
             "epsilon_round": task.privacy.epsilon_round if task.privacy else None,
             "epsilon_spent": task.privacy.epsilon_spent if task.privacy else None},
            new_weights, new_state, hub=hub,
        )
    seen.update({n: task.round for n in replay.seen if n not in seen})
    _save_nonces(store, layout, seen)
    results = [_site_result(store, layout, task.round, c.site) for c in contributors]
    report = AggregateReport(
        study=task.study,
        round=task.round,
        strategy=spec,
        contributors=contributors,
        rejected=rejected,
        missing=missing,
        federated_metrics=combine([r.global_metrics for r in results
                                   if r is not None and r.global_metrics is not None]),
        checkpoint_sha256=checkpoint.payload_sha256,
        duration_s=time.perf_counter() - start,
        privacy=task.privacy,
        secagg=outcome,
    )
    store.put_text(layout.aggregate(task.round), report.model_dump_json(indent=2))
    return report
