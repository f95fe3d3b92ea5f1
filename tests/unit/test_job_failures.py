"""How a trainer or aggregator Job ends, and what the round quotes of it: exit 2 on bad input
(FailJob), 75 on a store outage (counted against backoffLimit; a DP trainer gets none), 1 on a
crash; the cause in one line, last on stderr and in the termination message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from deeprad.core.errors import ConfigError, StoreUnavailable
from deeprad.core.jobargs import (
    EXIT_BAD_INPUT,
    EXIT_CRASH,
    EXIT_TRANSIENT,
    TERMINATION_LOG_ENV,
    job_main,
)
from deeprad.core.store import ObjectStore
from deeprad.operator.decide import round as rules
from deeprad.operator.render import jobs
from deeprad.operator.site.config import TrainingPlacement

OUTAGE = ("the store was unreachable for 600 s (connection refused, http://127.0.0.1:9000); "
          "gave up after 24 attempt(s)")


class _Task(BaseModel):
    study: str


class _Result(BaseModel):
    ok: bool


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         raised: BaseException | None, task: str = '{"study": "s"}') -> tuple[int, str, str]:
    """job_main with a job that raises `raised`; returns (exit code, stderr, termination)."""
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(termination))

    def run(_task: _Task, _store: ObjectStore) -> _Result:
        if raised is not None:
            raise raised
        return _Result(ok=True)

    code = job_main("deeprad.aggregator", "test", _Task, run,
                    ["--store", str(tmp_path / "store"), "--task", task])
    err = capsys.readouterr().err
    return code, err, termination.read_text() if termination.exists() else ""


def test_an_unreachable_store_exits_75_with_its_cause_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, err, termination = _run(tmp_path, monkeypatch, capsys, StoreUnavailable(OUTAGE))
    assert code == EXIT_TRANSIENT == 75
    assert termination == f"deeprad.aggregator: {OUTAGE}\n"
    assert err.splitlines()[-1] == termination.strip()


def test_a_network_fault_that_escaped_the_store_is_transient_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, termination = _run(tmp_path, monkeypatch, capsys,
                                ConnectionRefusedError(111, "Connection refused"))
    assert code == EXIT_TRANSIENT
    assert termination.startswith("deeprad.aggregator: the store or network failed "
                                  "(connection refused): ")


def test_bad_input_exits_2_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, termination = _run(tmp_path, monkeypatch, capsys, ConfigError(
        "FederatedRound r: spec.strategy.name 'avg'\nis unknown; use fedavg"))
    assert code == EXIT_BAD_INPUT == 2
    assert termination == ("deeprad.aggregator: FederatedRound r: spec.strategy.name 'avg' is "
                           "unknown; use fedavg\n")
    code, _, termination = _run(tmp_path, monkeypatch, capsys, None, task='{"round": 1}')
    assert code == EXIT_BAD_INPUT
    assert termination == "deeprad.aggregator: invalid task: study: Field required\n"


def test_a_crash_keeps_its_traceback_in_the_log_but_its_cause_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, err, termination = _run(tmp_path, monkeypatch, capsys,
                                  KeyError("weights.0"))
    assert code == EXIT_CRASH == 1
    assert "Traceback (most recent call last)" in err
    assert termination == "deeprad.aggregator: crashed: KeyError: 'weights.0'\n"
    assert err.splitlines()[-1] == termination.strip()


def test_success_prints_the_result_and_leaves_no_termination_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(termination))
    code = job_main("deeprad.trainer", "test", _Task, lambda t, s: _Result(ok=True),
                    ["--store", str(tmp_path / "store"), "--task", '{"study": "s"}'])
    assert code == 0 and json.loads(capsys.readouterr().out) == {"ok": True}
    assert not termination.exists()


def _policy_rules(job: dict[str, object]) -> list[tuple[str, list[int]]]:
    spec = job["spec"]
    assert isinstance(spec, dict)
    return [(r["action"], r["onExitCodes"]["values"]) for r in spec["podFailurePolicy"]["rules"]
            if "onExitCodes" in r]


def _container(job: dict[str, object]) -> dict[str, object]:
    spec = job["spec"]
    assert isinstance(spec, dict)
    (container,) = spec["template"]["spec"]["containers"]
    return dict(container)


def _trainer(retries: bool) -> dict[str, object]:
    ctx = jobs.JobContext(name="r-a", namespace="t", study="s", round_name="r", image="i")
    return jobs.trainer_job(ctx, "a", TrainingPlacement(), _Task(study="s"),
                            deadline_seconds=300, retries=retries)


def test_jobs_fail_at_once_on_bad_input_and_count_an_unreachable_store() -> None:
    plain, dp = _trainer(retries=True), _trainer(retries=False)
    for job in (plain, dp):
        assert _policy_rules(job) == [("FailJob", [EXIT_BAD_INPUT]), ("Count", [EXIT_TRANSIENT])]
    assert plain["spec"]["backoffLimit"] == 1  # type: ignore[index]
    # A DP-SGD run is never repeated (ε would be spent again): its own retries must heal it.
    assert dp["spec"]["backoffLimit"] == 0  # type: ignore[index]


def test_jobs_say_their_cause_in_the_termination_message_and_retry_within_their_deadline(
        ) -> None:
    job = _trainer(retries=True)
    container = _container(job)
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e.get("value") for e in container["env"]}  # type: ignore[attr-defined]
    assert env[TERMINATION_LOG_ENV] == "/dev/termination-log"
    # The store retries stop a minute before the Job's deadline, so it says why it failed.
    assert int(env["DEEPRAD_STORE_RETRY_SECONDS"]) == 240
    assert job["spec"]["activeDeadlineSeconds"] == 300  # type: ignore[index]


def test_the_round_quotes_the_termination_message() -> None:
    failed = rules.JobView.failed("BackoffLimitExceeded", "Job has reached the specified "
                                  "backoff limit", f"deeprad.aggregator: {OUTAGE}\n")
    assert failed.message == f"deeprad.aggregator: {OUTAGE} (BackoffLimitExceeded)"
    assert "\n" not in failed.message
