"""The resumable worker pool: markers make it resume, a worker's error or death is one line, finished work is kept."""

import os
from pathlib import Path

import pytest

from specalign.errors import SpecalignError
from specalign.pool import run_resumable


def square(task):
    n, folder = task
    if n < 0:
        raise SpecalignError(f"task {n}: negative")
    if n == 99:
        os._exit(3)  # a worker killed mid-task (e.g. by the kernel for memory)
    (Path(folder) / f"{n}.txt").write_text(str(n * n))
    return {"n": n, "square": n * n}


def marker(task):
    return Path(task[1]) / ".build" / f"{task[0]}.json"


@pytest.mark.parametrize("workers", [1, 2])
def test_runs_every_task_once_and_resumes_from_markers(tmp_path, workers):
    tasks = [(n, str(tmp_path)) for n in range(5)]
    done = run_resumable(square, tasks, marker, workers=workers, progress=False)
    assert done == [({"n": n, "square": n * n}, True) for n in range(5)]
    (tmp_path / ".build" / "3.json").unlink()  # as if killed before task 3's marker was written
    for n in (0, 1, 2, 4):
        (tmp_path / f"{n}.txt").unlink()  # finished tasks are not run again
    done = run_resumable(square, tasks, marker, workers=workers, progress=False)
    assert [ran for _, ran in done] == [False, False, False, True, False]
    assert [r["square"] for r, _ in done] == [0, 1, 4, 9, 16]
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["3.txt"]


def test_a_workers_error_stops_the_run_and_keeps_finished_tasks(tmp_path):
    tasks = [(n, str(tmp_path)) for n in (1, 2, -1, 3)]
    with pytest.raises(SpecalignError, match="task -1: negative"):
        run_resumable(square, tasks, marker, workers=2, progress=False)
    assert (tmp_path / ".build" / "1.json").is_file() or (tmp_path / ".build" / "2.json").is_file()


def test_a_dead_worker_is_one_line(tmp_path):
    tasks = [(n, str(tmp_path)) for n in (1, 99, 2)]
    with pytest.raises(SpecalignError, match="a worker process died .* run again to resume"):
        run_resumable(square, tasks, marker, workers=2, progress=False)


def test_a_corrupt_marker_is_named(tmp_path):
    (tmp_path / ".build").mkdir()
    (tmp_path / ".build" / "0.json").write_text("[1, 2]")
    with pytest.raises(SpecalignError, match=r"0.json: a finished-task marker that is not a JSON object"):
        run_resumable(square, [(0, str(tmp_path))], marker, progress=False)
