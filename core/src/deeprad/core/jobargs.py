"""Command-line plumbing shared by the trainer and aggregator Job entrypoints."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from deeprad.core.errors import DeepRadError
from deeprad.core.store import ObjectStore, open_store

T = TypeVar("T", bound=BaseModel)


def job_main(prog: str, description: str, task_type: type[T],
             run: Callable[[T, ObjectStore], BaseModel], argv: list[str] | None = None) -> int:
    """Parse `--store` and `--task`, run the job, print its result as JSON; exit 2 on bad input."""
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
        print(f"{prog}: invalid task: {exc}", file=sys.stderr)
        return 2
    except (DeepRadError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(result.model_dump_json())
    return 0
