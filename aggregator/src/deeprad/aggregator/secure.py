"""The secure path: the hub's side of secure aggregation over the object store. The sites'
updates arrive masked; the hub verifies and decrypts each, sums them and unmasks only the sum,
so it learns the survivors' sample-weighted mean update and nothing about any one site.

Only strategies the catalogue says run on a secure sum (deeprad.core.strategies) get here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import torch

from deeprad.aggregator.verification import UpdateVerifier
from deeprad.core.envelope import open_envelope
from deeprad.core.errors import ConfigError, UpdateRejected
from deeprad.core.protocol import Contribution, Rejection, SecAggOutcome, SecAggSpec
from deeprad.core.secagg import (
    AdvertiseKeys,
    ConsistencySignature,
    HubSession,
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
    check_secure_aggregation(task.strategy.name)
    vlayout = VectorLayout.of(global_weights)
    config = round_config(task.namespace, task.study, task.round, spec, vlayout.size)
    if sorted(sites) != list(config.roster):
        raise ConfigError(f"secure aggregation roster {list(config.roster)} differs from the "
                          f"round's admitted sites {sorted(sites)}")
    quantizer = Quantizer(spec.clip, max_sites=len(config.roster))
    relay = StoreRelay(verifier.store, verifier.layout, task.round, spec.timeout_s, spec.poll_s)
    session = HubSession(config, verifier.hub, verifier.registry)
    rejections: list[Rejection] = []
    try:
        ads, bad = relay.collect("advertise", AdvertiseKeys, config.roster)
        session.rejected.update(bad)
        relay.post("advertised", session.collect_advertisements(ads))
        shares, bad = relay.collect("shares", ShareKeys, [a.site for a in ads])
        session.rejected.update(bad)
        for site, routed in session.route_shares(shares).items():
            relay.post("routed", routed, site)
        # Sites whose shares were routed to them are the ones that can upload a masked update.
        routed_to = [s for s in config.roster if relay.store.exists(
            relay.layout.secagg_message(task.round, "routed", s))]
        _wait_for_updates(verifier, routed_to, spec)
        contributions: dict[str, Contribution] = {}
        for site in routed_to:
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
    return tensors, [contributions[s] for s in result.survivors], outcome, rejections


def _wait_for_updates(verifier: UpdateVerifier, sites: list[str], spec: SecAggSpec) -> None:
    """Wait until each site of `sites` uploaded its masked update, or the step's deadline."""
    deadline = time.monotonic() + spec.timeout_s
    keys = [verifier.layout.update_manifest(verifier.task.round, s) for s in sites]
    while not all(verifier.store.exists(k) for k in keys) and time.monotonic() < deadline:
        time.sleep(spec.poll_s)
