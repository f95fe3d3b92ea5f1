"""The hub relays secure-aggregation messages through the object store.

Sites write `secagg/<step>/<site>.json`; the hub answers in `secagg/<step>.json` (to all) or
`secagg/<step>/<site>.json` (to one site), or writes `secagg/aborted.json` so that every site
stops waiting. Every message is signed inside the protocol, so the store is not trusted: a
forged or altered message is refused by `SiteSession` / `HubSession`, not by the relay.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from deeprad.core.errors import ObjectNotFound
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import SecAggSpec
from deeprad.core.secagg.errors import SecAggAborted
from deeprad.core.secagg.protocol import SecAggConfig
from deeprad.core.store import ObjectStore

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


def round_config(namespace: str, study: str, round_no: int, spec: SecAggSpec,
                 update_length: int) -> SecAggConfig:
    """The round's protocol config: the update's values plus one carrying the site's weight."""
    return SecAggConfig.create(namespace, study, round_no, spec.roster, update_length + 1,
                               spec.threshold)


class StoreRelay:
    """One round's message exchange in the store, with a deadline per wait."""

    def __init__(self, store: ObjectStore, layout: StudyLayout, round_no: int,
                 timeout_s: float, poll_s: float) -> None:
        self.store, self.layout, self.round = store, layout, round_no
        self.timeout_s, self.poll_s = timeout_s, poll_s

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
        deadline = time.monotonic() + self.timeout_s
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
                                    f"{self.timeout_s:g}s (secure aggregation round "
                                    f"{self.round}); the site stops without revealing anything")
            time.sleep(self.poll_s)

    def _sites_under(self, prefix: str) -> set[str]:
        return {k[len(prefix):-len(".json")] for k in self.store.list(prefix)
                if k.endswith(".json")}

    def mark_gone(self, site: str, reason: str) -> None:
        """Tell the hub's session not to wait for `site` any more (operator only)."""
        self.store.put_text(self._key(GONE, site), reason)

    def collect(self, step: str, kind: type[M], expected: Iterable[str]
                ) -> tuple[list[M], dict[str, str]]:
        """The hub waits until each of `expected` sites wrote its `step` message or the deadline
        passed; returns the parsed messages and, per site, why a message was refused."""
        want = set(expected)
        deadline = time.monotonic() + self.timeout_s
        prefix = self.layout.secagg_prefix(self.round) + f"{step}/"
        while True:
            present = self._sites_under(prefix)
            if want - self._sites_under(self.layout.secagg_prefix(self.round) + f"{GONE}/") \
                    <= present or time.monotonic() > deadline:
                break
            time.sleep(self.poll_s)
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
