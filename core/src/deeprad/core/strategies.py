"""The strategy catalogue: every aggregation strategy's name, summary, keyword-only parameters
(defaults and valid ranges) and capabilities, in one place.

The aggregator's classes (deeprad.aggregator.strategies) are constructed through it, the
operator's API derives its enum and CEL rules from it, and `deeprad strategies` and
`deeprad simulate` read it. It imports nothing heavy (no torch), so all of them can.
Adding a strategy: one entry here and one class file in aggregator/strategies/.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deeprad.core.errors import ConfigError


def number_text(value: float) -> str:
    """A parameter value as the catalogue's messages spell it: 1, 0.9, 0.001, 1e-05."""
    return f"{value:g}"


@dataclass(frozen=True)
class Parameter:
    """One keyword-only hyper-parameter of a strategy: its default and its valid values, an
    interval given by gt/ge (lower bound) and lt/le (upper bound), integers only if `integer`."""

    name: str
    default: float
    help: str
    integer: bool = False
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __post_init__(self) -> None:
        if (self.gt is not None and self.ge is not None) or (
                self.lt is not None and self.le is not None):
            raise ValueError(f"parameter {self.name}: give one lower and one upper bound")
        if not self.accepts(self.default):
            raise ValueError(f"parameter {self.name}: default {self.default} is not "
                             f"{self.valid_range}")

    @property
    def valid_range(self) -> str:
        """The valid values in words: `> 0`, `in [0, 1)`, `an integer >= 0`."""
        low = (f"[{number_text(self.ge)}" if self.ge is not None else
               f"({number_text(self.gt)}" if self.gt is not None else None)
        high = (f"{number_text(self.le)}]" if self.le is not None else
                f"{number_text(self.lt)})" if self.lt is not None else None)
        if low is not None and high is not None:
            text = f"in {low}, {high}"
        else:
            text = " and ".join(
                f"{op} {number_text(bound)}" for op, bound in (
                    (">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                if bound is not None) or "any number"
        return f"an integer {text}" if self.integer else text

    def accepts(self, value: float) -> bool:
        """Whether `value` is a valid setting (finite, in range, an integer if need be)."""
        return (math.isfinite(value)
                and (not self.integer or float(value).is_integer())
                and (self.gt is None or value > self.gt)
                and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt)
                and (self.le is None or value <= self.le))


@dataclass(frozen=True)
class StrategyInfo:
    """A catalogue entry: what the strategy is called and does, what it takes, what it can do."""

    name: str
    summary: str  # one line
    params: tuple[Parameter, ...] = ()
    # Memory independent of the number of sites: updates are folded in one at a time.
    streaming: bool = True
    # Looks at each update on its own (the robust ones), so secure aggregation must be off.
    needs_clear_updates: bool = False
    # The aggregator can run it on the secure-aggregation sum, which is all the hub sees then:
    # true of every strategy that starts from the sample-weighted mean (FedAvg, and the server
    # optimizers, whose state m and v is built from that mean alone).
    runs_on_secure_sum: bool = False

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"strategy {self.name}: parameter names repeat: {names}")
        if self.runs_on_secure_sum and (self.needs_clear_updates or not self.streaming):
            raise ValueError(f"strategy {self.name}: a strategy that runs on a secure sum "
                             "streams and needs no update in the clear")

    @property
    def defaults(self) -> dict[str, float]:
        """Every parameter at its default."""
        return {p.name: p.default for p in self.params}

    def validate(self, params: Mapping[str, Any]) -> dict[str, float]:
        """The keyword arguments of the strategy: the defaults updated with `params`, each
        checked (integers as int); ConfigError names the strategy, parameter, value and range."""
        known = {p.name: p for p in self.params}
        out = self.defaults
        for name, value in params.items():
            param = known.get(name)
            if param is None:
                takes = ", ".join(known) or "no parameters"
                raise ConfigError(f"strategy {self.name}: unknown parameter {name!r}; it takes "
                                  f"{takes}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    param.accepts(value)):
                raise ConfigError(f"strategy {self.name}: {name} must be {param.valid_range}, "
                                  f"got {value!r}")
            out[name] = int(value) if param.integer else float(value)
        return out


_SERVER_LR = "server learning rate η, scales the global step"
_FEDOPT_SUMMARY = "adaptive server optimizer (Reddi et al. 2021), {} rule; state m, v"


def _server_lr(default: float) -> Parameter:
    return Parameter("server_lr", default, _SERVER_LR, gt=0)


_BETA1 = Parameter("beta1", 0.9, "decay of the first moment m", ge=0, lt=1)
_BETA2 = Parameter("beta2", 0.99, "decay of the second moment v", ge=0, lt=1)
_TAU = Parameter("tau", 1e-3, "adaptivity: added to √v in the step's denominator", gt=0)

CATALOGUE: dict[str, StrategyInfo] = {s.name: s for s in (
    StrategyInfo("fedavg", "sample-weighted mean of the updates (McMahan et al. 2017)",
                 (_server_lr(1.0),), runs_on_secure_sum=True),
    StrategyInfo("fedavgm", "FedAvg with server momentum (Hsu et al. 2019); state m",
                 (_server_lr(1.0),
                  Parameter("momentum", 0.9, "server momentum β: m ← β·m + mean update",
                            ge=0, lt=1)), runs_on_secure_sum=True),
    StrategyInfo("fedadam", _FEDOPT_SUMMARY.format("Adam"),
                 (_server_lr(1e-2), _BETA1, _BETA2, _TAU), runs_on_secure_sum=True),
    StrategyInfo("fedyogi", _FEDOPT_SUMMARY.format("Yogi"),
                 (_server_lr(1e-2), _BETA1, _BETA2, _TAU), runs_on_secure_sum=True),
    StrategyInfo("fedadagrad", _FEDOPT_SUMMARY.format("Adagrad"),
                 (_server_lr(1e-2), _BETA1, _TAU), runs_on_secure_sum=True),
    StrategyInfo("fedmedian", "coordinate-wise median of the updates (robust)",
                 streaming=False, needs_clear_updates=True),
    StrategyInfo("trimmedmean", "coordinate-wise mean without the ⌊β·N⌋ largest and smallest "
                                "values (robust)",
                 (Parameter("beta", 0.1, "share of the updates trimmed at each end", ge=0,
                            lt=0.5),),
                 streaming=False, needs_clear_updates=True),
    StrategyInfo("krum", "(Multi-)Krum (Blanchard et al. 2017): mean of the most central "
                         "updates (robust)",
                 (Parameter("byzantine", 0, "f, poisoned updates to resist (needs N >= 2f + 3)",
                            integer=True, ge=0),
                  Parameter("select", 1, "how many best-scoring updates to average (1: Krum)",
                            integer=True, ge=1)),
                 streaming=False, needs_clear_updates=True),
)}


def strategy_info(name: str) -> StrategyInfo:
    """The catalogue entry of `name`; ConfigError lists the known names."""
    info = CATALOGUE.get(name)
    if info is None:
        raise ConfigError(f"unknown strategy {name!r}: use one of {', '.join(CATALOGUE)}")
    return info


def secure_sum_strategies() -> list[str]:
    """Names of the strategies that run under secure aggregation."""
    return [s.name for s in CATALOGUE.values() if s.runs_on_secure_sum]


def check_secure_aggregation(name: str) -> None:
    """ConfigError unless strategy `name` runs on the sum that secure aggregation reveals."""
    info = strategy_info(name)
    if info.runs_on_secure_sum:
        return
    why = ("needs every update in the clear" if info.needs_clear_updates
           else "does not run on a secure sum")
    raise ConfigError(f"strategy {name} {why}, but secure aggregation shows the hub only the "
                      f"sum of the updates: turn secure aggregation off, or use "
                      f"{' or '.join(secure_sum_strategies())}")


__all__ = ["CATALOGUE", "Parameter", "StrategyInfo", "check_secure_aggregation", "number_text",
           "secure_sum_strategies", "strategy_info"]
