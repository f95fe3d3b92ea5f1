"""Lifecycles with plain data: which SiteTasks and hub Jobs may go, a site's participation
counted from the rounds' status, and a hub registry whose handlers need no finalizer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kopf._core.intents import causes

from deeprad.operator.decide import cleanup, participation
from deeprad.operator.hub import build_registry
from deeprad.operator.hub.cleanup import LIVES
from deeprad.operator.hub.resources import nested_patch
from deeprad.operator.options import HubOptions

T0 = datetime(2030, 7, 7, 12, 0, tzinfo=UTC)
HISTORY = timedelta(minutes=10)


def test_an_ended_rounds_tasks_go_after_the_history_and_a_running_rounds_stay() -> None:
    rounds = {
        "running": cleanup.RoundLife("research", "r1"),
        "ended-now": cleanup.RoundLife("research", "r2", True, T0 - timedelta(minutes=1)),
        "ended-long-ago": cleanup.RoundLife("research", "r3", True, T0 - HISTORY),
        "ended-untimed": cleanup.RoundLife("research", "r4", True, None),
    }
    tasks = [cleanup.TaskRef(uid, "deeprad-site-a", f"task-{uid}") for uid in rounds]
    gone = cleanup.ended_tasks(tasks, rounds, T0, HISTORY)
    assert [t.round_uid for t in gone] == ["ended-long-ago", "ended-untimed"]


def test_orphans_go_only_when_two_sweeps_in_a_row_found_them() -> None:
    rounds = {"uid-live": cleanup.RoundLife("research", "r1")}
    live = cleanup.TaskRef("uid-live", "deeprad-site-a", "r1-uid-live")
    orphan = cleanup.TaskRef("uid-gone", "deeprad-site-a", "r0-uid-gone")
    first = cleanup.orphan_tasks([live, orphan], rounds)
    assert first == {orphan}
    assert cleanup.confirmed(set(), first) == set()  # seen once: maybe its round is not seen yet
    assert cleanup.confirmed(first, cleanup.orphan_tasks([live, orphan], rounds)) == {orphan}
    assert cleanup.confirmed(first, set()) == set()  # collected or its round appeared


def test_hub_jobs_of_deleted_rounds_are_orphans_and_other_jobs_are_not() -> None:
    rounds = {"0123456789": cleanup.RoundLife("research", "r1")}
    jobs = ["r1-01234567-prepare", "r1-01234567-aggregate", "r0-89abcdef-aggregate",
            "r0-89abcdef-prepare", "someone-elses-job"]
    assert cleanup.orphan_jobs(jobs, rounds) == {"r0-89abcdef-aggregate", "r0-89abcdef-prepare"}


def _entries(**states: str) -> dict[str, object]:
    return {"sites": [{"site": site, "state": state,
                       **({"reportTime": "2030-07-07T12:00:00Z"} if state == "Reported" else {})}
                      for site, state in states.items()]}


def test_participation_counts_admitted_rounds_and_the_last_report() -> None:
    r1 = participation.round_parts("research", "tumor-r1", {"studyRef": {"name": "tumor"}},
                                   _entries(a="Reported", b="Excluded", c="Dropped"))
    r2 = participation.round_parts("research", "tumor-r2", {"studyRef": {"name": "tumor"}},
                                   _entries(a="Training", b="Waiting"))
    r3 = participation.round_parts("lab", "by-hand", {}, _entries(a="Failed", c="Rejected"))
    assert set(r1) == {"a", "c"} and set(r2) == {"a"}  # excluded and waiting sites did not join
    a = participation.participation([r1["a"], r2["a"], r3["a"]])
    assert a.model_dump(mode="json", by_alias=True, exclude_none=True) == {
        "studies": ["lab/by-hand", "research/tumor"], "roundsJoined": 3, "roundsReported": 1,
        "roundsFailed": 1, "lastContributionTime": "2030-07-07T12:00:00Z"}
    c = participation.participation([r1["c"], r3["c"]])
    assert (c.rounds_joined, c.rounds_failed, c.last_contribution_time) == (
        2, 2, None)
    assert participation.participation([]).model_dump(by_alias=True, exclude_none=True) == {
        "roundsJoined": 0, "roundsReported": 0, "roundsFailed": 0}


def test_no_hub_handler_puts_a_finalizer_on_any_object() -> None:
    """Rounds, studies and sites stay deletable with the operator absent: kopf would add its
    finalizer for a mandatory deletion handler, a timer or a daemon; the hub has timers and a
    daemon, registered without it and stopped through their object's `lives` index."""
    registry = build_registry(HubOptions())
    spawning = registry._spawning.get_all_handlers()
    assert {h.id for h in spawning} >= {"site-heartbeat", "push-agent", "study-timer",
                                        "round-timer"}
    assert all(h.requires_finalizer is False for h in spawning)
    assert not any(h.requires_finalizer for h in registry._changing.get_all_handlers())
    # A timer runs while its object is in the index and stops once it left it (DELETED).
    heartbeat = next(h for h in spawning if h.id == "site-heartbeat")
    assert heartbeat.when is not None
    assert heartbeat.when(uid="u1", site_lives={"u1": [None]}) is True
    assert heartbeat.when(uid="u1", site_lives={}) is False
    push = next(h for h in spawning if h.id == "push-agent")
    assert push.when is not None
    push_spec = {"connection": {"mode": "push"}}
    assert push.when(uid="u1", spec=push_spec, site_lives={"u1": [None]}) is True
    assert push.when(uid="u1", spec={}, site_lives={"u1": [None]}) is False  # its own filter
    indices = {h.id for h in registry._indexing.get_all_handlers()}
    assert set(LIVES.values()) <= indices
    # Deletion work runs on the DELETED watch event, which needs no finalizer.
    watching = {h.id for h in registry._watching.get_all_handlers()}
    assert {"round-cleanup", "study-gone"} <= watching
    assert causes.Reason.DELETE not in {h.reason for h in registry._changing.get_all_handlers()}


def test_a_status_write_removes_what_a_nested_field_no_longer_has() -> None:
    """A merge patch keeps keys it does not mention: a participation that lost its last
    contribution must send null for it, or every later pass would find a change to write."""
    before = {"studies": ["research/tumor"], "roundsJoined": 1,
              "lastContributionTime": "2030-07-07T12:00:00Z"}
    after = {"roundsJoined": 0}
    assert nested_patch(before, after) == {"studies": None, "lastContributionTime": None,
                                           "roundsJoined": 0}
    assert nested_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}) == {"a": {"c": None}}
    assert nested_patch([1], [2]) == [2] and nested_patch(None, {"a": 1}) == {"a": 1}
