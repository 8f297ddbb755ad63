"""Killing a running job, for the kill tests: SIGKILL at a point and look for its workers, or interrupt a call."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def kill_after(proc: subprocess.Popen, out: Path, n_files: int, group: bool) -> list[int]:
    """SIGKILL the build once `out` holds n_files files (or when it ends); group=True kills its workers too.
    Returns the workers it had then."""
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if sum(1 for p in out.rglob("*") if p.is_file()) >= n_files:
            break
        time.sleep(0.02)
    workers = [k for k in children(proc.pid) if alive(k)]
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL) if group else os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return workers


def interrupt_at_call(monkeypatch, owner, name: str, n: int):
    """The n-th call of owner.name raises KeyboardInterrupt instead of running (a kill at that point); returns
    the real function, to put back for the resumed run."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, interrupted)
    return real
