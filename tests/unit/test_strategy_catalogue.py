"""The strategy catalogue in the core: its ranges refuse bad values with a one-line message
naming strategy, parameter, value and range; its defaults pass; its capabilities say the truth;
and it loads without torch."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from deeprad.core.errors import ConfigError
from deeprad.core.strategies import (
    CATALOGUE,
    Parameter,
    StrategyInfo,
    check_secure_aggregation,
    secure_sum_strategies,
    strategy_info,
)

# (strategy, params, the one-line message)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("trimmedmean", {"beta": 0.9}, "strategy trimmedmean: beta must be in [0, 0.5), got 0.9"),
    ("trimmedmean", {"beta": 0.5}, "strategy trimmedmean: beta must be in [0, 0.5), got 0.5"),
    ("trimmedmean", {"beta": -0.1}, "strategy trimmedmean: beta must be in [0, 0.5), got -0.1"),
    ("krum", {"byzantine": -3}, "strategy krum: byzantine must be an integer >= 0, got -3"),
    ("krum", {"byzantine": 1.5}, "strategy krum: byzantine must be an integer >= 0, got 1.5"),
    ("krum", {"select": 0}, "strategy krum: select must be an integer >= 1, got 0"),
    ("fedavg", {"server_lr": -1}, "strategy fedavg: server_lr must be > 0, got -1"),
    ("fedavg", {"server_lr": 0}, "strategy fedavg: server_lr must be > 0, got 0"),
    ("fedavg", {"server_lr": float("inf")}, "strategy fedavg: server_lr must be > 0, got inf"),
    ("fedavg", {"server_lr": float("nan")}, "strategy fedavg: server_lr must be > 0, got nan"),
    ("fedavg", {"server_lr": "fast"}, "strategy fedavg: server_lr must be > 0, got 'fast'"),
    ("fedavg", {"server_lr": True}, "strategy fedavg: server_lr must be > 0, got True"),
    ("fedavgm", {"momentum": 1.0}, "strategy fedavgm: momentum must be in [0, 1), got 1.0"),
    ("fedadam", {"beta1": 1}, "strategy fedadam: beta1 must be in [0, 1), got 1"),
    ("fedyogi", {"beta2": -0.5}, "strategy fedyogi: beta2 must be in [0, 1), got -0.5"),
    ("fedadagrad", {"tau": 0.0}, "strategy fedadagrad: tau must be > 0, got 0.0"),
    ("fedavg", {"momentum": 0.9}, "strategy fedavg: unknown parameter 'momentum'; it takes "
                                  "server_lr"),
    ("fedadagrad", {"beta2": 0.9}, "strategy fedadagrad: unknown parameter 'beta2'; it takes "
                                   "server_lr, beta1, tau"),
    ("fedmedian", {"beta": 0.1}, "strategy fedmedian: unknown parameter 'beta'; it takes no "
                                 "parameters"),
    ("fedbest", {}, "unknown strategy 'fedbest': use one of fedavg, fedavgm, fedadam, fedyogi, "
                    "fedadagrad, fedmedian, trimmedmean, krum"),
]


@pytest.mark.parametrize(("name", "params", "message"), REFUSED,
                         ids=[f"{n}-{p}" for n, p, _ in REFUSED])
def test_bad_values_are_refused_in_one_line(name: str, params: dict[str, Any],
                                            message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        strategy_info(name).validate(params)
    assert str(caught.value) == message


def test_every_range_is_refused_just_outside_and_accepted_at_its_edges() -> None:
    for info in CATALOGUE.values():
        for p in info.params:
            inside = [v for v in (p.ge, p.le) if v is not None]
            outside = [v for v in (p.gt, p.lt) if v is not None]
            outside += [p.ge - 1e-9] if p.ge is not None else []
            outside += [p.le + 1e-9] if p.le is not None else []
            for value in inside:
                assert info.validate({p.name: value})[p.name] == value, (info.name, p.name)
            for value in outside:
                with pytest.raises(ConfigError) as caught:
                    info.validate({p.name: value})
                assert str(caught.value) == (f"strategy {info.name}: {p.name} must be "
                                             f"{p.valid_range}, got {value!r}")
            assert outside, f"{info.name}.{p.name} has no range"


def test_defaults_are_accepted_and_filled_in() -> None:
    for info in CATALOGUE.values():
        assert info.validate({}) == info.defaults
        assert info.validate(info.defaults) == info.defaults
    assert strategy_info("fedadam").validate({"server_lr": 0.5}) == {
        "server_lr": 0.5, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def test_integer_parameters_come_back_as_integers() -> None:
    # The API's params are a map of numbers: krum's byzantine arrives as 2.0.
    params = strategy_info("krum").validate({"byzantine": 2.0, "select": 3})
    assert params == {"byzantine": 2, "select": 3}
    assert all(type(v) is int for v in params.values())
    assert type(strategy_info("fedavg").validate({"server_lr": 2})["server_lr"]) is float


def test_ranges_read_as_words() -> None:
    ranges = {(info.name, p.name): p.valid_range for info in CATALOGUE.values()
              for p in info.params}
    assert ranges[("fedavg", "server_lr")] == "> 0"
    assert ranges[("fedavgm", "momentum")] == "in [0, 1)"
    assert ranges[("fedadam", "beta2")] == "in [0, 1)"
    assert ranges[("fedyogi", "tau")] == "> 0"
    assert ranges[("trimmedmean", "beta")] == "in [0, 0.5)"
    assert ranges[("krum", "byzantine")] == "an integer >= 0"
    assert ranges[("krum", "select")] == "an integer >= 1"
    assert Parameter("x", 0.5, "", gt=0, le=1).valid_range == "in (0, 1]"


def test_capabilities() -> None:
    streaming = {n for n, s in CATALOGUE.items() if s.streaming}
    clear = {n for n, s in CATALOGUE.items() if s.needs_clear_updates}
    assert streaming == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    assert clear == {"fedmedian", "trimmedmean", "krum"} == set(CATALOGUE) - streaming
    # Every strategy built on the sample-weighted mean runs on the secure-aggregation sum.
    assert secure_sum_strategies() == ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
    assert set(secure_sum_strategies()) == streaming
    for info in CATALOGUE.values():
        assert info.summary and "\n" not in info.summary
        assert not (info.runs_on_secure_sum and info.needs_clear_updates)


def test_secure_aggregation_needs_a_strategy_that_runs_on_the_sum() -> None:
    for name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        check_secure_aggregation(name)
    with pytest.raises(ConfigError, match=r"^strategy krum needs every update in the clear, "
                                          r"but secure aggregation .*: turn secure aggregation "
                                          r"off, or use fedavg or fedavgm or fedadam or fedyogi "
                                          r"or fedadagrad$"):
        check_secure_aggregation("krum")


def test_an_inconsistent_entry_is_refused_when_written() -> None:
    with pytest.raises(ValueError, match="default 0 is not > 0"):
        Parameter("server_lr", 0, "", gt=0)
    with pytest.raises(ValueError, match="one lower and one upper bound"):
        Parameter("x", 1, "", gt=0, ge=0)
    with pytest.raises(ValueError, match="repeat"):
        StrategyInfo("twice", "", (Parameter("a", 1, ""), Parameter("a", 2, "")))
    with pytest.raises(ValueError, match="runs on a secure sum"):
        StrategyInfo("odd", "", needs_clear_updates=True, runs_on_secure_sum=True)


def test_the_catalogue_loads_without_torch() -> None:
    code = ("import sys, deeprad.core.strategies; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
