"""The red-team table: each attack test records (attack, where it was refused, the message), and
`pytest -k redteam` prints the table at the end of the run (tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    attack: str
    where: str
    message: str


REFUSALS: list[Refusal] = []


def refused(attack: str, where: str, message: str) -> None:
    """Record that `attack` was refused at `where` with `message` (its first line)."""
    line = next((ln.strip().lstrip("* ") for ln in message.strip().splitlines() if ln.strip()),
                "")
    REFUSALS.append(Refusal(attack, where, line))


def table() -> list[str]:
    """The recorded refusals as aligned text lines."""
    if not REFUSALS:
        return []
    rows = [("attack", "where refused", "message")]
    rows += [(r.attack, r.where, r.message) for r in REFUSALS]
    widths = [min(48, max(len(row[i]) for row in rows)) for i in range(2)]
    return [f"{a[:widths[0]]:<{widths[0]}}  {w[:widths[1]]:<{widths[1]}}  {m}" for a, w, m in rows]
