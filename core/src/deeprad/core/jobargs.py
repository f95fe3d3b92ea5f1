"""Command-line plumbing shared by the trainer and aggregator Job entrypoints.

A Job ends in one of three ways the Job's podFailurePolicy tells apart (`render/jobs.py`):
0 with its result as JSON on stdout; 2 on bad input (a task it refuses, data or signatures
that do not verify: retrying cannot help, so the Job fails at once); 75 (EX_TEMPFAIL) when the
store stayed unreachable past the retry window (`deeprad.core.store.retry`): another pod may
succeed, so the Job's backoffLimit counts it. Anything else is a bug: exit 1, its traceback in
the log. Whatever the cause, the last line on stderr and the container's termination message
($DEEPRAD_TERMINATION_LOG, i.e. its terminationMessagePath) say it in one line, which is what
a round's failure message quotes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from deeprad.core.errors import DeepRadError, StoreUnavailable, field_problems
from deeprad.core.store import ObjectStore, open_store
from deeprad.core.store.retry import transient_cause

T = TypeVar("T", bound=BaseModel)
EXIT_CRASH = 1
EXIT_BAD_INPUT = 2  # retrying cannot help: the Job fails at once
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: the store was unreachable; another pod may succeed
TERMINATION_LOG_ENV = "DEEPRAD_TERMINATION_LOG"
MESSAGE_LIMIT = 1000  # characters of the one-line cause (kubelet keeps 4096 bytes)


def job_main(prog: str, description: str, task_type: type[T],
             run: Callable[[T, ObjectStore], BaseModel], argv: list[str] | None = None) -> int:
    """Parse `--store` and `--task`, run the job, print its result as JSON; exit 2 on bad
    input, 75 on a store outage, 1 on a bug, each with its cause in one line."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--store", default=os.environ.get("DEEPRAD_STORE"),
                        help="object store URL: a path, file:///path or s3://bucket?endpoint=H:P "
                             "(env DEEPRAD_STORE)")
    parser.add_argument("--task", default=os.environ.get("DEEPRAD_TASK"),
                        help="the task as JSON, or @FILE to read it from a file (env DEEPRAD_TASK)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.store or not args.task:
        parser.error("both --store and --task are required")
    try:
        text = Path(args.task[1:]).read_text() if args.task.startswith("@") else args.task
        task = task_type.model_validate_json(text)
        result = run(task, open_store(args.store))
    except ValidationError as exc:
        return fail(prog, EXIT_BAD_INPUT, f"invalid task: {field_problems(exc)}")
    except Exception as exc:
        code, cause = exit_for(exc)
        if code == EXIT_CRASH:
            traceback.print_exc()
        return fail(prog, code, cause)
    print(result.model_dump_json())
    return 0


def exit_for(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line cause of a failed Job: a store outage (also a network fault
    that escaped the store's retries) is transient, Deep-Rad's own errors and OS errors are
    bad input, anything else a crash."""
    if isinstance(exc, StoreUnavailable):
        return EXIT_TRANSIENT, str(exc)
    cause = transient_cause(exc)
    if cause is not None:
        return EXIT_TRANSIENT, f"the store or network failed ({cause}): {exc}"
    if isinstance(exc, (DeepRadError, OSError)):
        return EXIT_BAD_INPUT, str(exc)
    return EXIT_CRASH, f"crashed: {type(exc).__name__}: {exc}"


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line (whitespace runs collapsed), at most `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def fail(prog: str, code: int, cause: str) -> int:
    """Say why the Job failed on one line, last on stderr and in the termination message;
    returns `code`."""
    line = one_line(f"{prog}: {cause}")
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get(TERMINATION_LOG_ENV)
    if path:
        try:
            Path(path).write_text(line + "\n", encoding="utf-8")
        except OSError as exc:  # no such mount (outside Kubernetes): stderr has it
            logging.getLogger(prog).debug("termination message not written: %s", exc)
    return code
