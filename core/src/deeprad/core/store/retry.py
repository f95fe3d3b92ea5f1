"""Transient store faults, told apart from bad input, and retried with backoff within a deadline.

An S3 server that restarts, a load balancer that answers 503 SlowDown, a dropped connection:
each heals on its own, and a Job that gave up at the first refused connection fails a round
that would have succeeded a minute later (worse, a DP-SGD trainer's Job is never re-run, since
a second run spends ε again, so the trainer's own retry is what heals it). A 403 (expired or
altered URL), a 404, a digest or signature mismatch or a malformed object will not change by
waiting, so they are never retried: they fail at once and, in a Job, exit 2 (bad input). A 409
is retried only when S3 says why (OperationAborted, ConditionalRequestConflict): any other
conflict, such as BucketAlreadyOwnedByYou, is an answer that waiting will not change.

`transient_cause` is the one classification; `RetryPolicy.call` is the one retry loop, used by
both backends (`S3Store` through minio, `PresignedStore` through urllib). It retries with
exponential backoff and jitter until the outage has lasted `window_s` (10 min by default) or
the Job's deadline comes (`$DEEPRAD_STORE_RETRY_SECONDS` after the process started, set by the
Job manifest a little short of its activeDeadlineSeconds so the cause is still told), logging
each retry on one line; then it raises `StoreUnavailable`, which a Job ends on with exit 75.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import random
import re
import socket
import time
import urllib.error
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from deeprad.core.errors import DeepRadError, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger("deeprad.store")

RETRY_SECONDS_ENV = "DEEPRAD_STORE_RETRY_SECONDS"
DEFAULT_WINDOW_S = 600.0
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
# With these codes S3 asks for a retry, whatever the status (409 for the last two).
TRANSIENT_S3_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError",
                                "RequestTimeout", "Throttling", "OperationAborted",
                                "ConditionalRequestConflict"})
_S3_CODE = re.compile(r"<Code>\s*([^<\s]+)\s*</Code>")
_REFUSED = (ConnectionRefusedError,)
_RESET = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
          http.client.RemoteDisconnected, http.client.IncompleteRead)
_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
                   errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE}


class RetryableAnswer(Exception):
    """A server's answer that asks for a retry, raised by a client that had to read the
    answer's body to tell (an S3 error code behind a urllib HTTPError)."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def answer_cause(status: int | None, s3_code: str | None = None) -> str | None:
    """A few words naming a transient answer (HTTP 408/429/5xx, S3's SlowDown and friends,
    a 409 only with OperationAborted or ConditionalRequestConflict); None for a final one."""
    if s3_code in TRANSIENT_S3_CODES or status in TRANSIENT_HTTP:
        return " ".join(p for p in (f"HTTP {status}" if status else "", s3_code or "") if p)
    return None


def s3_error_code(body: str) -> str | None:
    """The `<Code>` of an S3 error answer's XML body, if it has one."""
    match = _S3_CODE.search(body)
    return match.group(1) if match else None


def transient_cause(exc: BaseException) -> str | None:
    """A few words naming the fault when `exc` is one that waiting can heal (connection
    refused or reset, a timeout, a DNS failure, a transient answer: `answer_cause`); None for
    everything else, bad input above all. The first server answer or Deep-Rad bad-input error
    met along the chain decides: what it was raised while handling no longer counts."""
    for link in _chain(exc):
        if isinstance(link, RetryableAnswer):
            return link.cause
        answered, cause = _answer(link)
        if answered:
            return cause
        cause = _network_cause(link)
        if cause is not None:
            return cause
        if isinstance(link, DeepRadError) and not isinstance(link, StoreUnavailable):
            return None  # e.g. a digest mismatch found while handling a reset connection
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: __cause__, __context__ (unless raised `from` something, None
    included), urllib's and urllib3's `reason`, and exceptions among its args (urllib3's
    ProtocolError carries the socket error there)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        link = todo.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        context = None if link.__suppress_context__ else link.__context__
        nested = [getattr(link, "reason", None), link.__cause__, context,
                  *getattr(link, "args", ())]
        todo += [n for n in nested if isinstance(n, BaseException)]


def _answer(exc: BaseException) -> tuple[bool, str | None]:
    """Whether `exc` is a server's answer (an HTTP status or an S3 error code), and its
    transient cause if it is one."""
    if isinstance(exc, urllib.error.HTTPError):
        return True, answer_cause(exc.code)
    status = getattr(exc, "status_code", None)  # minio's ServerError (a non-XML 5xx)
    if isinstance(status, int):
        return True, answer_cause(status)
    code = getattr(exc, "code", None)  # minio's S3Error
    response = getattr(exc, "response", None)
    if isinstance(code, str) and response is not None:
        return True, answer_cause(getattr(response, "status", None), code)
    if type(exc).__name__ == "ResponseError" and "too many" in str(exc):
        return True, str(exc)  # urllib3 gave up on repeated 5xx answers
    return False, None


def _network_cause(exc: BaseException) -> str | None:
    """A fault of the path to the server: refused, reset, timed out, name not resolved."""
    if isinstance(exc, socket.gaierror) or type(exc).__name__ == "NameResolutionError":
        return "DNS failure"
    if isinstance(exc, _REFUSED):
        return "connection refused"
    if isinstance(exc, _RESET):
        return "connection reset"
    if isinstance(exc, TimeoutError) or type(exc).__name__ in (
            "ReadTimeoutError", "ConnectTimeoutError"):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return os.strerror(exc.errno).lower() if exc.errno else "network error"
    if type(exc).__name__ == "ProtocolError":  # urllib3: the connection broke mid-answer
        return "connection reset"
    return None


@dataclass
class RetryPolicy:
    """How long and how often a store call is retried on a transient fault.

    `window_s` bounds one outage (from the call's first failure); `until` (a `clock()` time)
    is the Job's deadline, after which no retry starts. Delays double from `base_s` up to
    `cap_s`, each drawn between half and all of that (jitter: many trainers that lost the
    store at once do not all come back in the same instant)."""

    window_s: float = DEFAULT_WINDOW_S
    until: float | None = None
    base_s: float = 1.0
    cap_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        """The default window, ending by $DEEPRAD_STORE_RETRY_SECONDS from now when set (the
        Job manifest sets it from the round's deadline)."""
        env = os.environ if environ is None else environ
        text = env.get(RETRY_SECONDS_ENV, "").strip()
        policy = cls()
        if text:
            try:
                seconds = float(text)
            except ValueError:
                log.warning("%s=%r is not a number of seconds; retrying for at most %.0f s",
                            RETRY_SECONDS_ENV, text, policy.window_s)
            else:
                policy.until = policy.clock() + max(0.0, seconds)
        return policy

    def delay(self, attempt: int) -> float:
        """The wait before retry number `attempt` (1, 2, ...)."""
        ceiling = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        return ceiling * self.rng.uniform(0.5, 1.0)

    def call(self, where: str, fn: Callable[[], T]) -> T:
        """`fn()`, retried while it fails transiently and time is left; then StoreUnavailable
        naming `where` (the store's endpoint), the cause and how long it lasted. Any other
        exception passes through at once."""
        first: float | None = None
        attempt = 0
        while True:
            try:
                return fn()
            except StoreUnavailable:
                raise
            except Exception as exc:
                cause = transient_cause(exc)
                if cause is None:
                    raise
                now = self.clock()
                first = now if first is None else first
                attempt += 1
                wait = self.delay(attempt)
                give_up = first + self.window_s
                if self.until is not None:
                    give_up = min(give_up, self.until)
                if now + wait > give_up:
                    raise StoreUnavailable(
                        f"the store was unreachable for {now - first:.0f} s ({cause}, {where}); "
                        f"gave up after {attempt} attempt(s)"
                        + (" at the task's deadline" if give_up == self.until else "")
                    ) from exc
                log.warning("store unreachable (%s, %s), retry %d in %.0f s", cause, where,
                            attempt, wait)
                self.sleep(wait)
