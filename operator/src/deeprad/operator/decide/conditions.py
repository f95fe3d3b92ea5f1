"""metav1.Condition-shaped status conditions: set one, merge several, read one back.

`lastTransitionTime` changes only when a condition's status flips; a new reason or message
with the same status keeps the old time, as kubectl users and alerting rules expect.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from deeprad.operator.api.common import Condition, ConditionStatus
from deeprad.operator.decide.timeutil import rfc3339


@dataclass(frozen=True)
class Desired:
    """What a condition should say now; `set_condition` adds the transition time."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""

    @classmethod
    def true(cls, type_: str, reason: str, message: str = "") -> Desired:
        return cls(type_, ConditionStatus.TRUE, reason, message)

    @classmethod
    def false(cls, type_: str, reason: str, message: str = "") -> Desired:
        return cls(type_, ConditionStatus.FALSE, reason, message)

    @classmethod
    def unknown(cls, type_: str, reason: str, message: str = "") -> Desired:
        return cls(type_, ConditionStatus.UNKNOWN, reason, message)


def find(conditions: Iterable[Condition] | None, type_: str) -> Condition | None:
    """The condition of this type, or None."""
    return next((c for c in conditions or () if c.type == type_), None)


def is_true(conditions: Iterable[Condition] | None, type_: str) -> bool:
    """Whether the condition of this type exists and is True."""
    found = find(conditions, type_)
    return found is not None and found.status == ConditionStatus.TRUE


def set_condition(conditions: Sequence[Condition] | None, desired: Desired, generation: int | None,
                  now: datetime) -> list[Condition]:
    """`conditions` with `desired` set: the transition time is `now` only if the type is new
    or its status flipped; other conditions keep their place and content."""
    old = find(conditions, desired.type)
    transition = (old.last_transition_time if old is not None and old.status == desired.status
                  else rfc3339(now))
    new = Condition(type=desired.type, status=desired.status, reason=desired.reason,
                    message=desired.message, observed_generation=generation,
                    last_transition_time=transition)
    out = [new if c.type == desired.type else c for c in conditions or ()]
    if old is None:
        out.append(new)
    return out


def merge(conditions: Sequence[Condition] | None, desired: Iterable[Desired],
          generation: int | None, now: datetime) -> list[Condition]:
    """`conditions` with every desired condition set (see `set_condition`)."""
    out = list(conditions or ())
    for d in desired:
        out = set_condition(out, d, generation, now)
    return out


def dump(conditions: Sequence[Condition]) -> list[dict[str, object]]:
    """Conditions as the API spells them (camelCase, no nulls), for a status patch."""
    return [c.model_dump(mode="json", exclude_none=True) for c in conditions]
