"""The study's replay ledger: every nonce an aggregation accepted, and the round that accepted
it, kept in the store (layout.seen_nonces()) so that a replayed update is refused in any later
round."""

from __future__ import annotations

import json

from deeprad.core.errors import ConfigError, ObjectNotFound
from deeprad.core.layout import StudyLayout
from deeprad.core.signing import ReplayGuard
from deeprad.core.store import ObjectStore


class ReplayLedger:
    """Nonce -> round that accepted it, for one study."""

    def __init__(self, store: ObjectStore, layout: StudyLayout, seen: dict[str, int]) -> None:
        self.store, self.layout, self.seen = store, layout, seen

    @classmethod
    def load(cls, store: ObjectStore, layout: StudyLayout) -> ReplayLedger:
        """The study's ledger (empty before its first aggregation)."""
        try:
            data = json.loads(store.get_bytes(layout.seen_nonces()))
        except ObjectNotFound:
            data = {}
        except ValueError as exc:
            raise ConfigError(f"{layout.seen_nonces()} is corrupt ({exc}); restore it from a "
                              "backup: without it replayed updates cannot be refused") from None
        return cls(store, layout, {str(k): int(v) for k, v in data.items()})

    def guard(self, round_no: int) -> ReplayGuard:
        """A guard for round `round_no`. Nonces this round accepted in an attempt that did not
        finish may come again (a rerun is idempotent); every other accepted nonce is refused."""
        return ReplayGuard(n for n, r in self.seen.items() if r != round_no)

    def record(self, round_no: int, guard: ReplayGuard) -> None:
        """Add the nonces `guard` accepted in round `round_no` and write the ledger back."""
        self.seen.update({n: round_no for n in guard.seen if n not in self.seen})
        self.store.put_text(self.layout.seen_nonces(),
                            json.dumps(self.seen, sort_keys=True, indent=0))
