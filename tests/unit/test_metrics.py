"""The operator's ε metrics: the study's budget from its spec, ε spent per site as the status
lists it, and every series of a deleted study dropped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from deeprad.operator import metrics
from deeprad.operator.api.federatedstudy import FederatedStudySpec, FederatedStudyStatus
from deeprad.operator.hub.studies import export_study

NAMESPACE = "oncology"
STUDY, OTHER = "unit-eps-study", "unit-eps-other"


@pytest.fixture(autouse=True)
def _forget() -> Iterator[None]:
    yield
    for study in (STUDY, OTHER):
        metrics.forget_study(NAMESPACE, study)


def _value(name: str, study: str = STUDY, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, {"namespace": NAMESPACE, "study": study,
                                                    **labels})


def _study_series(study: str) -> list[str]:
    return [f"{s.name}{s.labels}" for m in metrics.REGISTRY.collect() for s in m.samples
            if s.labels.get("namespace") == NAMESPACE and s.labels.get("study") == study]


def test_epsilon_budget_gauge_is_spec_privacy_budget_and_absent_without_one() -> None:
    spec = {"model": {"name": "tumor-cnn"}, "rounds": 5}
    dp = FederatedStudySpec.model_validate({**spec, "privacyBudget": {"epsilon": 3.5,
                                                                      "delta": 1e-5}})
    export_study(NAMESPACE, STUDY, dp, FederatedStudyStatus(epsilon_spent=1.25), None)
    assert _value("deeprad_study_epsilon_budget") == 3.5
    assert _value("deeprad_study_epsilon_spent") == 1.25

    plain = FederatedStudySpec.model_validate(spec)
    export_study(NAMESPACE, OTHER, plain, FederatedStudyStatus(), None)
    assert _value("deeprad_study_epsilon_budget", OTHER) is None  # no division by zero
    metrics.record_study_budget(NAMESPACE, STUDY, None)
    assert _value("deeprad_study_epsilon_budget") is None


def test_site_epsilon_gauge_follows_the_status_per_site() -> None:
    metrics.record_site_epsilon(NAMESPACE, STUDY, {"st-marys": 1.5, "charite": 0.75})
    metrics.record_site_epsilon(NAMESPACE, OTHER, {"st-marys": 4.0})
    assert _value("deeprad_site_epsilon_spent", site="st-marys") == 1.5
    assert _value("deeprad_site_epsilon_spent", site="charite") == 0.75

    metrics.record_site_epsilon(NAMESPACE, STUDY, {"st-marys": 2.0})
    assert _value("deeprad_site_epsilon_spent", site="st-marys") == 2.0
    assert _value("deeprad_site_epsilon_spent", site="charite") is None  # no stale value
    assert _value("deeprad_site_epsilon_spent", OTHER, site="st-marys") == 4.0


def test_forget_study_drops_every_series_of_the_study_epsilon_included() -> None:
    per_study = [c for c in metrics.REGISTRY._collector_to_names  # no public listing
                 if isinstance(c, MetricWrapperBase)
                 and {"namespace", "study"} <= set(c._labelnames)]
    assert len(per_study) >= 18
    for study in (STUDY, OTHER):
        for metric in per_study:
            labels = {name: {"namespace": NAMESPACE, "study": study}.get(name, "x")
                      for name in metric._labelnames}
            if isinstance(metric, Histogram):
                metric.labels(**labels).observe(1.0)
            elif isinstance(metric, (Counter, Gauge)):
                metric.labels(**labels).inc()
    assert len(_study_series(STUDY)) >= len(per_study)

    metrics.forget_study(NAMESPACE, STUDY)
    assert _study_series(STUDY) == []
    assert len(_study_series(OTHER)) >= len(per_study)  # another study keeps its series
