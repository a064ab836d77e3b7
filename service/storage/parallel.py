"""Several statements at once, one per connection: what ``audit verify``/``export`` (ops/audit.py) and ``replay``
(ops/replay.py) use to keep both cores of PostgreSQL busy."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg


def parallel(conns: Sequence[psycopg.Connection[Any]], jobs: Sequence[Callable[[psycopg.Connection[Any]], Any]]
             ) -> list[Any]:
    """Run ``jobs`` on ``conns``, one thread per connection taking the next job when it is free (psycopg
    releases the GIL while PostgreSQL works); returns the results in job order, re-raises the first error."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    pending = iter(range(len(jobs)))
    lock = threading.Lock()

    def worker(conn: psycopg.Connection[Any]) -> None:
        while not errors:
            with lock:
                i = next(pending, None)
            if i is None:
                return
            try:
                results[i] = jobs[i](conn)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(conn,), daemon=True) for conn in conns[:len(jobs)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
