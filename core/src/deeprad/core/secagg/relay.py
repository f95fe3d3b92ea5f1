"""The hub relays secure-aggregation messages through the object store.

Sites write `secagg/<step>/<site>.json`; the hub answers in `secagg/<step>.json` (to all) or
`secagg/<step>/<site>.json` (to one site), or writes `secagg/aborted.json` so that every site
stops waiting. Every message is signed inside the protocol, so the store is not trusted: a
forged or altered message is refused by `SiteSession` / `HubSession`, not by the relay.

Timeouts. A round's `timeout_s` (SecAggSpec, and the SiteTask's timeoutSeconds) is the window W
from the start of the exchange to the round's deadline. Only the first wait covers training;
each later step is a short exchange of small messages (and one masked upload), bounded by
`step_timeout(W)` = W / 20, at least 10 s and at most 120 s. The hub closes its first wait (the
key advertisements, which sites send once trained) at W - 4 steps, so that its four later
waits (shares, masked inputs, consistency, unmasking) fit before the deadline even if each
times out. A site that dies silently after advertising its keys therefore costs the round one
step timeout, not the rest of its deadline; one that never advertises costs the training
window, unless the operator marks it gone first (its Job failed). A site waits for the hub's
first answer the whole window W (the hub may still be waiting for slower sites) and for each
later one `SITE_WAIT_STEPS` steps: the hub's own step plus its work on the updates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from deeprad.core.errors import ConfigError, ObjectNotFound
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import SecAggSpec
from deeprad.core.secagg.errors import SecAggAborted
from deeprad.core.store import ObjectStore

if TYPE_CHECKING:  # the protocol and distributed DP need numpy, which the operator never loads
    from deeprad.core.secagg.protocol import SecAggConfig

M = TypeVar("M", bound=BaseModel)
ABORTED = "aborted"
# What one site touches in the exchange: the messages it writes and the hub's answers it reads
# (to every site, or routed to it alone). The hub presigns exactly these for a site.
SITE_POSTS = ("advertise", "shares", "consistency", "unmask")
HUB_BROADCASTS = ("advertised", "survivors", "confirmed", ABORTED)
HUB_ROUTED = ("routed",)
# The operator marks a site whose training ended without an update (its Job failed, or it
# missed the deadline), so the hub stops waiting for that site's messages.
GONE = "gone"

STEP_SHARE_OF_WINDOW = 1 / 20
MIN_STEP_S, MAX_STEP_S = 10.0, 120.0
HUB_STEPS_AFTER_TRAINING = 4  # shares, masked inputs, consistency, unmasking
SITE_WAIT_STEPS = 4
HUB_FIRST = "advertise"  # the hub's first wait, while sites train
SITE_FIRST = "advertised"  # a site's first wait, while the others train


def step_timeout(window_s: float) -> float:
    """How long any party waits for one exchange step after training, from the window W."""
    return min(MAX_STEP_S, max(MIN_STEP_S, window_s * STEP_SHARE_OF_WINDOW))


def training_window(window_s: float) -> float:
    """How long the hub waits for the sites' key advertisements (they train first): the window
    less the later steps' timeouts, at least one step."""
    step = step_timeout(window_s)
    return max(step, window_s - HUB_STEPS_AFTER_TRAINING * step)


def round_config(namespace: str, study: str, round_no: int, spec: SecAggSpec,
                 update_length: int) -> SecAggConfig:
    """The round's protocol config: the update's values plus one carrying the site's weight,
    or with distributed DP the update rotated to a power-of-two length (every site weighs 1)."""
    from deeprad.core.distributed_dp import padded_length
    from deeprad.core.secagg.protocol import SecAggConfig

    ddp = spec.distributed_dp
    length = update_length + 1 if ddp is None else padded_length(update_length)
    config = SecAggConfig.create(namespace, study, round_no, spec.roster, length,
                                 spec.threshold)
    if ddp is not None and (ddp.noise_shares > config.threshold
                            or ddp.max_sites < len(config.roster)):
        raise ConfigError(
            f"secure aggregation {namespace}/{study} round {round_no}: distributed DP is planned "
            f"for {ddp.noise_shares} noise share(s) and at most {ddp.max_sites} site(s), but the "
            f"round unmasks sums of {config.threshold} of {len(config.roster)}: plan it with "
            "noise_shares <= the threshold and max_sites >= the roster")
    return config


class StoreRelay:
    """One round's message exchange in the store, with a deadline per wait: `timeout_s` is the
    round's window W, from which each step's timeout is derived (see the module docstring)."""

    def __init__(self, store: ObjectStore, layout: StudyLayout, round_no: int,
                 timeout_s: float, poll_s: float) -> None:
        self.store, self.layout, self.round = store, layout, round_no
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.step_s = step_timeout(timeout_s)

    def hub_timeout(self, step: str) -> float:
        """How long the hub waits for the sites' messages of `step`."""
        return training_window(self.timeout_s) if step == HUB_FIRST else self.step_s

    def site_timeout(self, step: str) -> float:
        """How long a site waits for the hub's message of `step`."""
        return self.timeout_s if step == SITE_FIRST else min(
            self.timeout_s, SITE_WAIT_STEPS * self.step_s)

    def _key(self, step: str, site: str | None = None) -> str:
        return self.layout.secagg_message(self.round, step, site)

    def post(self, step: str, message: Any, site: str | None = None) -> None:
        """Write a message (a pydantic model or a list of them)."""
        text = TypeAdapter(type(message) if isinstance(message, BaseModel) else list[Any]
                           ).dump_json(message).decode()
        self.store.put_text(self._key(step, site), text)

    def abort(self, reason: str) -> None:
        """Tell every site the round stopped (hub only)."""
        self.store.put_text(self._key(ABORTED), reason)

    def wait_hub(self, step: str, kind: Any, site: str | None = None) -> Any:
        """A site waits for the hub's message of `step` and parses it as `kind`; raises
        SecAggAborted when the hub aborted the round or the deadline passed."""
        timeout = self.site_timeout(step)
        deadline = time.monotonic() + timeout
        key = self._key(step, site)
        while True:
            try:
                text = self.store.get_text(key)
            except ObjectNotFound:
                text = None
            if text is not None:
                return TypeAdapter(kind).validate_json(text)
            try:
                reason = self.store.get_text(self._key(ABORTED))
            except ObjectNotFound:
                reason = None
            if reason is not None:
                raise SecAggAborted(f"the hub aborted secure aggregation: {reason}")
            if time.monotonic() > deadline:
                raise SecAggAborted(f"no {step!r} message from the hub within "
                                    f"{timeout:g}s (secure aggregation round "
                                    f"{self.round}); the site stops without revealing anything")
            time.sleep(self.poll_s)

    def _sites_under(self, prefix: str) -> set[str]:
        return {k[len(prefix):-len(".json")] for k in self.store.list(prefix)
                if k.endswith(".json")}

    def mark_gone(self, site: str, reason: str) -> None:
        """Tell the hub's session not to wait for `site` any more (operator only)."""
        self.store.put_text(self._key(GONE, site), reason)

    def gone(self) -> set[str]:
        """The sites the operator marked gone."""
        return self._sites_under(self.layout.secagg_prefix(self.round) + f"{GONE}/")

    def wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Poll `done` until it holds or `timeout_s` passed; whether it held."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            time.sleep(self.poll_s)
        return True

    def collect(self, step: str, kind: type[M], expected: Iterable[str]
                ) -> tuple[list[M], dict[str, str]]:
        """The hub waits until each of `expected` sites wrote its `step` message, was marked
        gone, or the step's timeout passed; returns the parsed messages and, per site, why a
        message was refused."""
        want = set(expected)
        prefix = self.layout.secagg_prefix(self.round) + f"{step}/"
        present: set[str] = set()

        def arrived() -> bool:
            nonlocal present
            present = self._sites_under(prefix)
            return want - self.gone() <= present

        self.wait_until(arrived, self.hub_timeout(step))
        messages: list[M] = []
        rejected: dict[str, str] = {}
        for site in sorted(present & want):
            try:
                msg = kind.model_validate_json(self.store.get_bytes(self._key(step, site)))
            except (ObjectNotFound, ValidationError) as exc:
                rejected[site] = f"{step} message is malformed: {str(exc)[:200]}"
                continue
            if getattr(msg, "site", site) != site:
                rejected[site] = f"{step} message in {site}'s slot names another site"
                continue
            messages.append(msg)
        return messages, rejected
