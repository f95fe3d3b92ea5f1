"""The secure path: the hub's side of secure aggregation over the object store. The sites'
updates arrive masked; the hub verifies and decrypts each, sums them and unmasks only the sum,
so it learns the survivors' sample-weighted mean update and nothing about any one site.

Every strategy the catalogue says runs on a secure sum (deeprad.core.strategies) gets here:
FedAvg and the server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) need only that mean.

Each wait is bounded by its step's timeout (deeprad.core.secagg.relay), so a site that stops
answering costs one step; the round stops early, before any site reveals an unmasking share,
once fewer sites are left than its minSites, and any failure tells the sites to stop waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from deeprad.aggregator.verification import UpdateVerifier
from deeprad.core import distributed_dp
from deeprad.core.envelope import open_envelope
from deeprad.core.errors import ConfigError, UpdateRejected
from deeprad.core.protocol import (
    AggregationTask,
    Contribution,
    Rejection,
    SecAggOutcome,
    SecAggSpec,
)
from deeprad.core.secagg import (
    AdvertiseKeys,
    ConsistencySignature,
    HubSession,
    SecAggAborted,
    SecAggError,
    ShareKeys,
    UnmaskingShares,
)
from deeprad.core.secagg.quantize import Quantizer, VectorLayout, unflatten, unpack
from deeprad.core.secagg.relay import StoreRelay, round_config
from deeprad.core.strategies import check_secure_aggregation

log = logging.getLogger("deeprad.aggregator")


def secure_mean(verifier: UpdateVerifier, spec: SecAggSpec, sites: list[str],
                global_weights: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], list[Contribution], SecAggOutcome,
                           list[Rejection]]:
    """Run the hub's side of secure aggregation over the store; returns the sample-weighted
    mean delta of the survivors, their contributions, what happened, and the rejected sites."""
    task = verifier.task
    relay = StoreRelay(verifier.store, verifier.layout, task.round, spec.timeout_s, spec.poll_s)
    rejections: list[Rejection] = []
    try:  # whatever stops the hub tells the sites to stop waiting
        check_secure_aggregation(task.strategy.name)
        vlayout = VectorLayout.of(global_weights)
        config = round_config(task.namespace, task.study, task.round, spec, vlayout.size)
        if sorted(sites) != list(config.roster):
            raise ConfigError(f"secure aggregation roster {list(config.roster)} differs from "
                              f"the round's admitted sites {sorted(sites)}")
        quantizer = Quantizer(spec.clip, max_sites=len(config.roster))
        session = HubSession(config, verifier.hub, verifier.registry)
        ads, bad = relay.collect("advertise", AdvertiseKeys, config.roster)
        session.rejected.update(bad)
        advertised = session.collect_advertisements(ads)
        _need_quorum(task, "advertised keys", [a.site for a in advertised], config.roster)
        relay.post("advertised", advertised)
        shares, bad = relay.collect("shares", ShareKeys, [a.site for a in ads])
        session.rejected.update(bad)
        for site, routed in session.route_shares(shares).items():
            relay.post("routed", routed, site)
        # Sites whose shares were routed to them are the ones that can upload a masked update.
        routed_to = [s for s in config.roster if relay.store.exists(
            relay.layout.secagg_message(task.round, "routed", s))]
        uploaded = _wait_for_updates(verifier, relay, routed_to)
        contributions: dict[str, Contribution] = {}
        for site in uploaded:
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
                rejections.append(Rejection(site=site, reason=reason))
        survivors = session.survivor_set()
        _need_quorum(task, "sent a valid masked update", survivors.survivors, config.roster)
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
    rejections.extend(Rejection(site=s, reason=f"secure aggregation: {r}")
                      for s, r in sorted(result.rejected.items())
                      if s not in {x.site for x in rejections})
    if spec.distributed_dp is None:
        mean, mean_bound = _weighted_mean(quantizer, result.sum, len(result.survivors),
                                          task.round)
    else:  # a noisy sum of clipped, rotated updates: undo the rotation, every site weighs 1
        mean, mean_bound = distributed_dp.decode_mean(result.sum, spec.distributed_dp,
                                                      config.digest, vlayout.size,
                                                      len(result.survivors))
    outcome = SecAggOutcome(survivors=list(result.survivors), dropped=list(result.dropped),
                            not_joined=list(result.not_joined), threshold=config.threshold,
                            clip=spec.clip, quantization_bound=mean_bound)
    tensors = unflatten(mean.astype(np.float32), vlayout)
    return tensors, [contributions[s] for s in result.survivors], outcome, rejections


def _weighted_mean(quantizer: Quantizer, ring_sum: np.ndarray, survivors: int, round_no: int
                   ) -> tuple[np.ndarray, float]:
    """The sample-weighted mean from the ring sum of (n/N)·delta and n/N, and its worst-case
    quantization error per value."""
    total = quantizer.decode_sum(ring_sum, survivors).astype(np.float64)
    weight = float(total[-1])
    bound = quantizer.error_bound(survivors)
    if not weight > bound:
        raise ConfigError(f"secure aggregation round {round_no}: the survivors' total weight "
                          f"{weight:g} is not above the quantization error {bound:g}")
    mean = total[:-1] / weight
    # |(S + e) / (W + e') - S / W| <= e (1 + |S / W|) / (W - e)
    return mean, bound * (1 + float(np.abs(mean).max(initial=0.0))) / (weight - bound)


def _wait_for_updates(verifier: UpdateVerifier, relay: StoreRelay, sites: list[str]
                      ) -> list[str]:
    """Wait one step for each site of `sites` to upload its masked update (or be marked gone);
    returns the sites that did. The others dropped out: the protocol removes their masks."""
    def manifest(site: str) -> str:
        return verifier.layout.update_manifest(verifier.task.round, site)

    relay.wait_until(lambda: all(verifier.store.exists(manifest(s))
                                 for s in set(sites) - relay.gone()), relay.step_s)
    return [s for s in sites if verifier.store.exists(manifest(s))]


def _need_quorum(task: AggregationTask, what: str, have: Sequence[str],
                 roster: Sequence[str]) -> None:
    """Stop the exchange, before any site reveals a share, once the round's minSites cannot be
    met: fewer sites than that took this step."""
    if len(have) < task.min_sites:
        missing = [s for s in roster if s not in set(have)]
        raise SecAggAborted(
            f"study {task.study} round {task.round}: secure aggregation: {len(have)} of "
            f"{len(roster)} site(s) {what}, minSites is {task.min_sites} (missing: "
            f"{', '.join(missing) or 'none'}); the round fails without unmasking anything")
