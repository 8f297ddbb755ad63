"""One resumable worker pool: run a job's tasks in worker processes, skip the tasks already finished, and never
leave a worker running behind a dead parent.

    records = run_resumable(build_sequence, tasks, marker=lambda t: out / ".build" / f"{t.name}.json",
                            workers=4, desc="world build", unit="clip", size=lambda t: t.n_clips)

`fn(task)` writes the task's files (atomically) and returns a JSON-able record; once it has returned, the pool
writes the record as the task's marker, so a marker means every file of its task is complete. A re-run reads
the markers back and runs only the tasks without one. Workers are spawned (no inherited threads or locks) and
die with their parent: the kernel kills them when it dies (Linux PR_SET_PDEATHSIG), and a watchdog thread ends
them when their parent pid changes (any platform; also covers a parent that died before the first check).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

from specalign.errors import SpecalignError, fail
from specalign.fsutil import read_json, write_json

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_SECONDS = 0.5


def run_resumable(
    fn: Callable,
    tasks: Sequence,
    marker: Callable[[object], Path],
    workers: int = 1,
    progress: bool = True,
    desc: str = "",
    unit: str = "task",
    size: Callable[[object], int] = lambda task: 1,
) -> list[tuple[dict, bool]]:
    """(record, ran_now) for every task, in task order: read from its marker when the task was finished before,
    else from `fn(task)` (in up to `workers` processes; in this one when workers is 1 or one task is left).

    `fn` must be importable (a module-level function) and its tasks picklable. The bar counts `size(task)` units.
    """
    from tqdm import tqdm

    records: list[dict | None] = [None] * len(tasks)
    for i, task in enumerate(tasks):
        if marker(task).is_file():
            records[i] = _read_marker(marker(task))
    todo = [i for i, r in enumerate(records) if r is None]
    total = sum(size(t) for t in tasks)
    done = total - sum(size(tasks[i]) for i in todo)
    bar = tqdm(total=total, initial=done, unit=unit, desc=desc, disable=not progress, smoothing=0.05)
    try:
        for i, record in _run(fn, tasks, todo, workers):
            write_json(marker(tasks[i]), record, indent=None)
            records[i] = record
            bar.update(size(tasks[i]))
    finally:
        bar.close()
    ran = set(todo)
    return [(r, i in ran) for i, r in enumerate(records)]


def _read_marker(path: Path) -> dict:
    record = read_json(path)
    if not isinstance(record, dict):
        raise fail(path, "a finished-task marker that is not a JSON object; delete it to redo the task")
    return record


def _run(fn, tasks, todo: list[int], workers: int):
    """Yield (i, fn(tasks[i])) for i in todo, in the order they finish."""
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            yield i, fn(tasks[i])
        return
    pool = ProcessPoolExecutor(
        min(workers, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        with _env(OMP_NUM_THREADS="1"):  # workers start inside submit(): one BLAS thread each, they run side by side
            pending = {pool.submit(fn, tasks[i]): i for i in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in sorted(finished, key=lambda f: f.exception() is not None):  # results before an error
                i = pending.pop(future)
                yield i, future.result()  # re-raises a worker's error here
    except BrokenProcessPool:
        raise SpecalignError(
            "a worker process died (killed, or out of memory?); finished work is kept: run again to resume"
        ) from None
    except BaseException:
        # an error (or a caller that stopped early): stop the other workers now, not after their task; what
        # they leave is temp files, which a resume removes
        for p in list((getattr(pool, "_processes", None) or {}).values()):
            if p.is_alive():
                p.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if old[k] is None})  # a value the user set wins
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this process when `parent` (the pid that started the pool) is gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watch-parent").start()


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(WATCH_SECONDS)
        if os.getppid() != parent:
            os._exit(1)
