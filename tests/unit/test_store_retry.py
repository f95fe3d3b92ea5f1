"""Store faults: transient ones (refused, reset, timeouts, DNS, 5xx, SlowDown) retried with
backoff and jitter within a deadline, logged one line per retry; bad input never retried.
PresignedStore is driven against a real loopback HTTP server."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import urllib.error
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
from minio.error import S3Error, ServerError

from deeprad.core.errors import CheckpointError, ObjectNotFound, StoreError, StoreUnavailable
from deeprad.core.jobargs import EXIT_BAD_INPUT, EXIT_TRANSIENT, exit_for
from deeprad.core.store.presigned import PresignedStore
from deeprad.core.store.retry import RETRY_SECONDS_ENV, RetryPolicy, transient_cause
from deeprad.devenv.ports import free_port


def _http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://s3/x", code, "status", http.client.HTTPMessage(), None)


def _s3_error(code: str, status: int) -> S3Error:
    response = urllib3.HTTPResponse(status=status)
    return S3Error(response, code, "message", "/b/k", "req", "host")


def _raised_while_handling(inner: BaseException, outer: BaseException,
                            suppress: bool = False) -> BaseException:
    """`outer` as Python leaves it when raised in an `except` block for `inner` (with
    `from None` when `suppress`)."""
    try:
        try:
            raise inner
        except BaseException:
            if suppress:
                raise outer from None
            raise outer  # noqa: B904 - the implicit __context__ is what is under test
    except BaseException as exc:
        return exc
    raise AssertionError("unreachable")


def _refused_by_urllib3() -> BaseException:
    pool = urllib3.HTTPConnectionPool("127.0.0.1", 9000)
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError:
        try:
            raise urllib3.exceptions.NewConnectionError(
                None, "Failed to establish a new connection: [Errno 111] Connection refused")
        except urllib3.exceptions.NewConnectionError as new:
            return urllib3.exceptions.MaxRetryError(pool, "/b/k", new)


TRANSIENT: list[tuple[str, Callable[[], BaseException], str]] = [
    ("refused", lambda: ConnectionRefusedError(111, "refused"), "connection refused"),
    ("urllib refused", lambda: urllib.error.URLError(ConnectionRefusedError(111, "refused")),
     "connection refused"),
    ("urllib3 refused", _refused_by_urllib3, "connection refused"),
    ("reset", lambda: ConnectionResetError(104, "reset"), "connection reset"),
    ("urllib3 broken answer", lambda: urllib3.exceptions.ProtocolError(
        "Connection aborted.", ConnectionResetError(104, "reset")), "connection reset"),
    ("remote closed", lambda: http.client.RemoteDisconnected("closed"), "connection reset"),
    ("timeout", lambda: TimeoutError("timed out"), "timed out"),
    ("read timeout", lambda: urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"),
     "timed out"),
    ("dns", lambda: urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
     "DNS failure"),
    ("503", lambda: _http_error(503), "HTTP 503"),
    ("500", lambda: _http_error(500), "HTTP 500"),
    ("429", lambda: _http_error(429), "HTTP 429"),
    ("408", lambda: _http_error(408), "HTTP 408"),
    ("SlowDown", lambda: _s3_error("SlowDown", 503), "HTTP 503 SlowDown"),
    ("InternalError", lambda: _s3_error("InternalError", 500), "HTTP 500 InternalError"),
    ("non-XML 502", lambda: ServerError("bad gateway", 502), "HTTP 502"),
    ("409 OperationAborted", lambda: _s3_error("OperationAborted", 409),
     "HTTP 409 OperationAborted"),
    ("409 ConditionalRequestConflict", lambda: _s3_error("ConditionalRequestConflict", 409),
     "HTTP 409 ConditionalRequestConflict"),
    ("unavailable, from the outage", lambda: _raised_while_handling(
        ConnectionResetError(104, "reset"), StoreUnavailable("gave up")), "connection reset"),
]

BAD_INPUT: list[tuple[str, Callable[[], BaseException]]] = [
    ("403", lambda: _http_error(403)),
    ("404", lambda: _http_error(404)),
    ("400", lambda: _http_error(400)),
    ("412", lambda: _http_error(412)),
    ("AccessDenied", lambda: _s3_error("AccessDenied", 403)),
    ("NoSuchKey", lambda: _s3_error("NoSuchKey", 404)),
    ("digest mismatch", lambda: CheckpointError("sha256 of the payload differs")),
    ("invalid data", lambda: ValueError("not JSON")),
    ("missing object", lambda: ObjectNotFound("no object 'x'")),
    ("no such file", lambda: FileNotFoundError(2, "No such file", "/data/x")),
    ("409 BucketAlreadyOwnedByYou", lambda: _s3_error("BucketAlreadyOwnedByYou", 409)),
    ("409 without an S3 code", lambda: _http_error(409)),
    ("digest mismatch while handling a reset", lambda: _raised_while_handling(
        ConnectionResetError(104, "reset"), CheckpointError("sha256 of the payload differs"))),
    ("a plain error raised from None while handling a reset", lambda: _raised_while_handling(
        ConnectionResetError(104, "reset"), ValueError("not JSON"), suppress=True)),
    ("404 while handling a refused connection", lambda: _raised_while_handling(
        ConnectionRefusedError(111, "refused"), _http_error(404))),
]


@pytest.mark.parametrize(("exc", "cause"), [(e, c) for _, e, c in TRANSIENT],
                         ids=[i for i, _, _ in TRANSIENT])
def test_transient_faults_are_named(exc: Callable[[], BaseException], cause: str) -> None:
    assert transient_cause(exc()) == cause


@pytest.mark.parametrize("exc", [e for _, e in BAD_INPUT], ids=[i for i, _ in BAD_INPUT])
def test_bad_input_is_not_transient(exc: Callable[[], BaseException]) -> None:
    assert transient_cause(exc()) is None


def test_a_digest_mismatch_found_after_a_reset_ends_the_job_as_bad_input() -> None:
    # The trainer's read hit a reset, and the check of what it read then failed: exit 2 at
    # once, not 75 after retrying a mismatch for ten minutes.
    mismatch = _raised_while_handling(ConnectionResetError(104, "reset"),
                                      CheckpointError("global model: sha256 differs"))
    assert exit_for(mismatch) == (EXIT_BAD_INPUT, "global model: sha256 differs")
    assert exit_for(ConnectionResetError(104, "reset"))[0] == EXIT_TRANSIENT


class FakeTime:
    """A clock that moves only when the policy sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _policy(time: FakeTime, **kwargs: Any) -> RetryPolicy:
    return RetryPolicy(clock=time.clock, sleep=time.sleep, **kwargs)


def _failing(times: int, exc: Callable[[], BaseException] = lambda: ConnectionRefusedError(
        111, "refused")) -> Callable[[], str]:
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc()
        return "ok"

    return fn


def test_retries_until_the_store_answers_with_growing_jittered_delays(
        caplog: pytest.LogCaptureFixture) -> None:
    time = FakeTime()
    caplog.set_level(logging.WARNING, "deeprad.store")
    assert _policy(time).call("http://127.0.0.1:9000", _failing(8)) == "ok"
    assert len(time.sleeps) == 8
    for attempt, delay in enumerate(time.sleeps, start=1):
        ceiling = min(30.0, 2.0 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling, (attempt, delay)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 8
    assert lines[2].startswith("store unreachable (connection refused, http://127.0.0.1:9000), "
                               "retry 3 in ")
    assert all("\n" not in line for line in lines)


def test_jitter_spreads_the_retries_of_many_clients() -> None:
    delays = {round(RetryPolicy().delay(5), 3) for _ in range(50)}
    assert len(delays) > 10 and min(delays) >= 8.0 and max(delays) <= 16.0


def test_gives_up_when_the_store_stays_down_past_the_window() -> None:
    time = FakeTime()
    with pytest.raises(StoreUnavailable) as info:
        _policy(time, window_s=600).call("http://127.0.0.1:9000", _failing(10_000))
    waited = sum(time.sleeps)
    assert 570 <= waited <= 600
    message = str(info.value)
    assert message.startswith(f"the store was unreachable for {waited:.0f} s (connection "
                              "refused, http://127.0.0.1:9000); gave up after ")
    assert "deadline" not in message and "\n" not in message


def test_gives_up_at_the_tasks_deadline() -> None:
    time = FakeTime()
    policy = _policy(time, until=time.now + 45)
    with pytest.raises(StoreUnavailable, match=r"at the task's deadline$"):
        policy.call("s3", _failing(10_000, lambda: _http_error(503)))
    assert sum(time.sleeps) <= 45
    # A call after the deadline does not retry at all.
    time.now = policy.until + 1 if policy.until is not None else time.now
    with pytest.raises(StoreUnavailable, match=r"unreachable for 0 s \(HTTP 503, s3\)"):
        policy.call("s3", _failing(1, lambda: _http_error(503)))


def test_each_failing_call_gets_its_own_window() -> None:
    time = FakeTime()
    policy = _policy(time, window_s=60)
    assert policy.call("s3", _failing(4)) == "ok"
    assert policy.call("s3", _failing(4)) == "ok"  # a second call starts a fresh window


@pytest.mark.parametrize("exc", [e for _, e in BAD_INPUT], ids=[i for i, _ in BAD_INPUT])
def test_bad_input_is_raised_at_once(exc: Callable[[], BaseException]) -> None:
    time = FakeTime()
    expected = type(exc())
    with pytest.raises(expected):
        _policy(time).call("s3", _failing(1, exc))
    assert time.sleeps == []


def test_the_deadline_comes_from_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RetryPolicy.from_env({}).until is None
    policy = RetryPolicy.from_env({RETRY_SECONDS_ENV: "120"})
    assert policy.until is not None and 119 < policy.until - policy.clock() <= 120
    assert RetryPolicy.from_env({RETRY_SECONDS_ENV: "soon"}).until is None


# ---- PresignedStore against a real HTTP server ------------------------------------------------


Answer = int | tuple[int, str]  # a status, or a status and an S3 error code


class _Server:
    """A loopback HTTP server answering each request with the next answer of `script`; a GET
    answered 200 returns `stored`."""

    def __init__(self, script: list[Answer], stored: bytes = b"payload") -> None:
        self.script = list(script)
        self.stored = stored
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests.append(self.command)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                answer = outer.script.pop(0) if outer.script else 200
                status, code = answer if isinstance(answer, tuple) else (answer, "")
                body = (outer.stored if status == 200 and self.command == "GET" else
                        f"<Error><Code>{code}</Code></Error>".encode())
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def store(self, time: FakeTime) -> PresignedStore:
        base = f"http://127.0.0.1:{self.port}/deeprad"
        return PresignedStore({"a/in.bin": f"{base}/a/in.bin?X-Amz-Signature=s",
                               "a/out.bin": f"{base}/a/out.bin?X-Amz-Signature=s"},
                              f"http://127.0.0.1:{self.port}", timeout_s=5,
                              retry=_policy(time, window_s=120))


ServerFactory = Callable[..., _Server]


@pytest.fixture
def server_factory() -> Iterator[ServerFactory]:
    made: list[_Server] = []

    def make(script: list[Answer], stored: bytes = b"payload") -> _Server:
        made.append(_Server(script, stored))
        return made[-1]

    yield make
    for server in made:
        server.http.shutdown()
        server.http.server_close()


def test_presigned_get_heals_after_503s(server_factory: ServerFactory) -> None:
    server, time = server_factory([503, 503, 502]), FakeTime()
    assert server.store(time).get_bytes("a/in.bin") == b"payload"
    assert server.requests == ["GET"] * 4 and len(time.sleeps) == 3


@pytest.mark.parametrize("via", ["bytes", "file"])
def test_presigned_put_after_a_lost_answer_counts_as_done(
        server_factory: ServerFactory, tmp_path: Path, via: str) -> None:
    # The first PUT reached the store (500 after storing) and the retry hears 412: it landed
    # (the signed manifest names the payload's digest; other bytes would be refused).
    server, time = server_factory([500, 412], stored=b"update"), FakeTime()
    store = server.store(time)
    if via == "bytes":
        store.put_bytes("a/out.bin", b"update")
    else:
        (tmp_path / "u.bin").write_bytes(b"update")
        store.put_file("a/out.bin", tmp_path / "u.bin")
    assert server.requests == ["PUT", "PUT"]


def test_presigned_put_after_a_conflict_is_not_taken_as_ours(
        server_factory: ServerFactory) -> None:
    # 409: another write to the key was in flight. It is retried, and the 412 that follows
    # means the other writer won, not that this upload landed: the write-once error.
    server = server_factory([(409, "ConditionalRequestConflict"), 412], stored=b"update")
    time = FakeTime()
    with pytest.raises(StoreError, match=r"refused \(412 Precondition Failed\): the object "
                                         "exists and objects a site writes are write-once"):
        server.store(time).put_bytes("a/out.bin", b"update")
    assert server.requests == ["PUT", "PUT"] and len(time.sleeps) == 1


def test_presigned_conflict_without_a_retry_code_is_not_retried(
        server_factory: ServerFactory) -> None:
    server, time = server_factory([(409, "BucketAlreadyOwnedByYou")]), FakeTime()
    with pytest.raises(StoreError, match=r"^presigned store: PUT 'a/out.bin' failed: HTTP 409 "
                                         "<Error><Code>BucketAlreadyOwnedByYou"):
        server.store(time).put_bytes("a/out.bin", b"update")
    assert server.requests == ["PUT"] and time.sleeps == []


@pytest.mark.parametrize(("status", "error"), [(403, StoreError), (404, ObjectNotFound),
                                               (400, StoreError)])
def test_presigned_bad_input_is_not_retried(server_factory: ServerFactory,
                                            status: int, error: type[Exception]) -> None:
    server, time = server_factory([status]), FakeTime()
    with pytest.raises(error) as info:
        server.store(time).get_bytes("a/in.bin")
    assert not isinstance(info.value, StoreUnavailable)
    assert server.requests == ["GET"] and time.sleeps == []


def test_presigned_store_that_never_comes_back_names_the_cause() -> None:
    port, time = free_port(), FakeTime()  # nothing listens there: connection refused
    store = PresignedStore({"a/in.bin": f"http://127.0.0.1:{port}/deeprad/a/in.bin?s=1"},
                           f"http://127.0.0.1:{port}", timeout_s=5,
                           retry=_policy(time, window_s=300))
    with pytest.raises(StoreUnavailable) as info:
        store.get_bytes("a/in.bin")
    assert str(info.value).startswith(
        f"the store was unreachable for {sum(time.sleeps):.0f} s (connection refused, "
        f"http://127.0.0.1:{port}); gave up after ")
