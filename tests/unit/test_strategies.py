"""Every strategy against its formula on small hand-computed inputs."""

from __future__ import annotations

import pytest
import torch

from deeprad.aggregator import STRATEGIES, aggregate, make_strategy
from deeprad.aggregator.strategies import FedAvg, FedMedian
from deeprad.core.errors import ConfigError
from deeprad.core.protocol import StrategySpec

G = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
U1 = {"w": torch.tensor([1.0, 0.0, -1.0]), "b": torch.tensor([2.0])}
U2 = {"w": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([-2.0])}
U3 = {"w": torch.tensor([-4.0, 100.0, 0.0]), "b": torch.tensor([1.0])}


def close(a: torch.Tensor, b: list[float]) -> None:
    torch.testing.assert_close(a, torch.tensor(b), rtol=1e-6, atol=1e-6)


def test_fedavg_is_the_sample_weighted_mean() -> None:
    new, state = aggregate("fedavg", G, [(U1, 1), (U2, 3)])
    # mean delta = (1*U1 + 3*U2) / 4 = [2.5, 1.5, 0.5], b: (2 - 6)/4 = -1
    close(new["w"], [3.5, 3.5, 3.5])
    close(new["b"], [-0.5])
    assert state == {}


def test_fedavg_server_lr_scales_the_step() -> None:
    new, _ = aggregate("fedavg", G, [(U1, 1), (U2, 3)], server_lr=0.5)
    close(new["w"], [2.25, 2.75, 3.25])


def test_streaming_fedavg_equals_batch_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    glob = {f"t{i}": torch.randn(17, 5, generator=gen) for i in range(4)}
    ups = [({k: torch.randn_like(v) for k, v in glob.items()}, n) for n in (5, 11, 2, 40, 7)]
    new, _ = aggregate("fedavg", glob, ups)
    total = sum(n for _, n in ups)
    for k in glob:
        batch = glob[k] + torch.stack([u[k] * n for u, n in ups]).sum(0) / total
        torch.testing.assert_close(new[k], batch, rtol=1e-5, atol=1e-6)


def test_fedavgm_carries_momentum_between_rounds() -> None:
    new1, state1 = aggregate("fedavgm", G, [(U1, 1)], momentum=0.5, server_lr=1.0)
    close(new1["w"], [2.0, 2.0, 2.0])  # m = U1
    close(state1["m/w"], [1.0, 0.0, -1.0])
    new2, state2 = aggregate("fedavgm", new1, [(U1, 1)], state=state1, momentum=0.5)
    # m = 0.5*U1 + U1 = 1.5*U1
    close(state2["m/w"], [1.5, 0.0, -1.5])
    close(new2["w"], [3.5, 2.0, 0.5])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_family_first_round(name: str) -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    decay = {} if name == "fedadagrad" else {"beta2": b2}  # Adagrad keeps every square
    new, state = aggregate(name, G, [(U1, 1), (U2, 1)], server_lr=lr, beta1=b1, tau=tau,
                           **decay)
    d = torch.tensor([2.0, 1.0, 0.0])
    m = (1 - b1) * d
    v = {"fedadam": (1 - b2) * d * d,
         "fedadagrad": d * d,
         # Yogi from v=0: v - (1-b2) d² sign(0 - d²) = (1-b2) d² where d != 0
         "fedyogi": (1 - b2) * d * d}[name]
    torch.testing.assert_close(state["m/w"], m)
    torch.testing.assert_close(state["v/w"], v)
    torch.testing.assert_close(new["w"], G["w"] + lr * m / (v.sqrt() + tau))


def test_fedyogi_second_round_uses_sign_rule() -> None:
    spec = {"server_lr": 1.0, "beta1": 0.0, "beta2": 0.5, "tau": 1.0}
    _, s1 = aggregate("fedyogi", G, [(U1, 1)], **spec)  # v = 0.5 * U1²
    _, s2 = aggregate("fedyogi", G, [(U2, 1)], state=s1, **spec)
    v1, d2 = 0.5 * U1["w"] ** 2, U2["w"] ** 2
    torch.testing.assert_close(s2["v/w"], v1 - 0.5 * d2 * torch.sign(v1 - d2))


def test_fedadagrad_accumulates_squares() -> None:
    spec = {"server_lr": 1.0, "beta1": 0.0, "tau": 1.0}
    _, s1 = aggregate("fedadagrad", G, [(U1, 1)], **spec)
    _, s2 = aggregate("fedadagrad", G, [(U2, 1)], state=s1, **spec)
    torch.testing.assert_close(s2["v/w"], U1["w"] ** 2 + U2["w"] ** 2)


def test_fedmedian_is_coordinatewise_and_ignores_the_outlier() -> None:
    new, _ = aggregate("fedmedian", G, [(U1, 1), (U2, 100), (U3, 1)])
    close(new["w"], [2.0, 4.0, 3.0])  # medians [1, 2, 0]
    new_even, _ = aggregate("fedmedian", G, [(U1, 1), (U2, 1)])
    close(new_even["w"], [3.0, 3.0, 3.0])  # mean of the two middle values


def test_trimmed_mean_drops_extremes() -> None:
    ups = [({"w": torch.tensor([float(v)]), "b": torch.tensor([0.0])}, 1)
           for v in (1, 2, 3, 4, 1000)]
    new, _ = aggregate("trimmedmean", {"w": torch.tensor([0.0]), "b": torch.tensor([0.0])}, ups,
                       beta=0.2)
    close(new["w"], [3.0])  # drops 1 and 1000: mean(2, 3, 4)


def test_krum_selects_the_update_closest_to_its_neighbours() -> None:
    base = {"w": torch.zeros(2), "b": torch.zeros(1)}
    pts = [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.3, 0.3], [50.0, 50.0]]
    ups = [({"w": torch.tensor(p), "b": torch.zeros(1)}, 1) for p in pts]
    strat = make_strategy(StrategySpec(name="krum", params={"byzantine": 1}))
    strat.begin(base)
    for u, n in ups:
        strat.add(u, n)
    # n - f - 2 = 2 nearest squared distances: 0.01+0.01, 0.01+0.02, 0.01+0.02, 0.13+0.13
    scores = strat.scores()
    torch.testing.assert_close(scores[:4], torch.tensor([0.02, 0.03, 0.03, 0.26],
                                                        dtype=torch.float64))
    assert scores[4] > 9000
    assert strat.chosen() == [0]
    new, _ = strat.finish()
    close(new["w"], [0.0, 0.0])


def test_multi_krum_averages_the_selected() -> None:
    base = {"w": torch.zeros(2), "b": torch.zeros(1)}
    pts = [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.3, 0.3], [50.0, 50.0]]
    new, _ = aggregate("krum", base, [({"w": torch.tensor(p), "b": torch.zeros(1)}, 1)
                                      for p in pts], byzantine=1, select=3)
    close(new["w"], [0.1 / 3, 0.1 / 3])  # the three best: points 0, 1, 2


def test_krum_needs_enough_updates() -> None:
    with pytest.raises(ConfigError, match="needs at least 5 updates"):
        aggregate("krum", G, [(U1, 1), (U2, 1)], byzantine=1)


def test_integer_tensors_stay_integers() -> None:
    glob = {"steps": torch.tensor([10]), "w": torch.tensor([0.0])}
    ups = [({"steps": torch.tensor([s]), "w": torch.tensor([1.0])}, 1) for s in (3, 4)]
    new, _ = aggregate("fedavg", glob, ups)
    assert new["steps"].dtype == torch.int64 and int(new["steps"]) == 14  # 10 + round(3.5)


def test_unknown_strategy_and_bad_parameters_are_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown strategy 'fedbest'.*fedavg"):
        make_strategy(StrategySpec(name="fedbest"))
    with pytest.raises(ConfigError, match="strategy fedavg: unknown parameter 'momentum'; it "
                                          "takes server_lr"):
        make_strategy(StrategySpec(name="fedavg", params={"momentum": 0.9}))
    with pytest.raises(ConfigError, match=r"beta must be in \[0, 0.5\), got 0.7"):
        make_strategy(StrategySpec(name="trimmedmean", params={"beta": 0.7}))
    with pytest.raises(ConfigError, match="strategy krum: select must be an integer >= 1, "
                                          "got 0"):
        aggregate("krum", G, [(U1, 1)], select=0)


def test_make_strategy_fills_defaults_and_records_checked_parameters() -> None:
    krum = make_strategy(StrategySpec(name="krum", params={"byzantine": 1.0}))
    assert krum.params() == {"byzantine": 1, "select": 1}
    assert isinstance(krum.params()["byzantine"], int)  # as the API's float map gives it
    fedadam = make_strategy(StrategySpec(name="fedadam", params={"server_lr": 0.5}))
    assert fedadam.params() == {"server_lr": 0.5, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert make_strategy(StrategySpec(name="fedmedian")).params() == {}


def test_every_strategy_is_registered_and_documented() -> None:
    assert set(STRATEGIES) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                               "fedmedian", "trimmedmean", "krum"}
    for cls in STRATEGIES.values():
        assert cls.info.summary and cls.__doc__
        # the streaming flag matches the documented memory behaviour
        assert cls.streaming == (cls.name in {"fedavg", "fedavgm", "fedadam", "fedyogi",
                                               "fedadagrad"})


def test_a_class_that_disagrees_with_the_catalogue_is_refused_when_defined() -> None:
    with pytest.raises(TypeError, match="'fedbest' has no entry"):
        class FedBest(FedAvg):
            name = "fedbest"
    with pytest.raises(TypeError, match="differ from the catalogue"):
        class PositionalFedAvg(FedAvg):
            name = "fedavg"

            def __init__(self, server_lr: float = 1.0) -> None:
                super().__init__(server_lr=server_lr)
    with pytest.raises(TypeError, match="differ from the catalogue"):
        class OtherDefault(FedAvg):
            name = "fedavg"

            def __init__(self, *, server_lr: float = 2.0) -> None:
                super().__init__(server_lr=server_lr)
    with pytest.raises(TypeError, match="streaming is False"):
        class BufferedAvg(FedMedian):
            name = "fedavg"

            def __init__(self, *, server_lr: float = 1.0) -> None:
                super().__init__()
    with pytest.raises(TypeError, match="already FedAvg"):
        class SecondFedAvg(FedAvg):
            name = "fedavg"
    assert STRATEGIES["fedavg"] is FedAvg
