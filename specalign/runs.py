"""What makes a resumable job safe to resume: it remembers its settings and inputs, and one process writes at a time.

    with run_folder(out, settings, overwrite=cfg.overwrite) as out:   # refuses a run with other settings
        ...                                                             # resumable work; finished parts are kept

`settings` is a JSON-able dict of everything that changes the results: hyper-parameters, counts, and the
identities of the inputs (`dataset_identity`, `file_identity`, `models.weights_stamp`). A re-run with the same
settings resumes; with different ones it stops on one line naming the first difference, or, with
`overwrite=True`, clears the folder and starts over. Settings live in `<folder>/run_settings.json`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

from specalign.errors import SpecalignError, fail
from specalign.fsutil import ensure_dir, read_json, write_json

SETTINGS_FILE = "run_settings.json"
OVERWRITE_HELP = "start over: clear the output folder if it holds a run with other settings"
LOCK_FILE = ".lock"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_identity(path: str | Path) -> dict:
    """A file by resolved path and content hash (for inputs small enough to hash: indexes, token files)."""
    path = Path(path)
    if not path.is_file():
        raise fail(path, "file not found")
    return {"path": str(path.resolve()), "sha256": sha256_file(path)}


def dataset_identity(split: str | Path) -> dict:
    """A dataset split by resolved path and the hash of its index (which lists every clip and its files)."""
    from specalign.data.layout import INDEX_NAME

    split = Path(split)
    index = split / INDEX_NAME
    if not index.is_file():
        raise fail(split, f"not a dataset split ({INDEX_NAME} is missing)")
    return {"path": str(split.resolve()), "index_sha256": sha256_file(index)}


def first_difference(old, new, where: str = "") -> str | None:
    """'epochs: 8 -> 50' for the first key (depth first, in `new`'s order) whose value differs; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            d = first_difference(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{where}.{k}" if where else k)
            if d:
                return d
        return None
    if old != new:
        return f"{where or 'settings'}: {_short(old)} then, {_short(new)} now"
    return None


def _short(v) -> str:
    if isinstance(v, str):  # a long string is a path: its end tells two apart
        return repr(v if len(v) <= 78 else "..." + v[-75:])
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 80 else s[:77] + "..."


def check_settings(folder: str | Path, settings: dict, overwrite: bool = False) -> bool:
    """Compare `settings` with the run already in `folder`. Returns True when the folder was fresh or cleared
    (a new run), False when the same run resumes; raises on other settings unless overwrite."""
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # what a reload gives: tuples -> lists, Paths -> str
    if path.exists():
        diff = first_difference(read_json(path), settings)
        if diff is None:
            return False
        if not overwrite:
            raise fail(folder, f"holds a run with other settings ({diff}); pass --overwrite to start over, "
                               "or use another --out")  # fmt: skip
        clear_folder(folder)
    elif any(p.name != LOCK_FILE for p in folder.iterdir()):
        if not overwrite:
            raise fail(folder, "is not empty and holds no specalign run of this kind; use an empty or new --out "
                               "(or --overwrite to clear it)")  # fmt: skip
        clear_folder(folder)
    write_json(path, settings)
    return True


def clear_folder(folder: Path) -> None:
    """Remove everything in `folder` but the lock file (held by this process)."""
    for p in folder.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextmanager
def exclusive(folder: str | Path):
    """Hold `folder/.lock` for the block: a second process writing the same folder stops on one line."""
    folder = ensure_dir(folder)
    with open(folder / LOCK_FILE, "a+") as f:  # the lock dies with the process, however it ends
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise fail(folder, "another specalign process is writing here; wait for it or use another --out") from None
        yield folder


@contextmanager
def run_folder(folder: str | Path, settings: dict, overwrite: bool = False):
    """`exclusive` + `check_settings`: yields the folder, locked, holding this run's settings."""
    with exclusive(folder) as path:
        check_settings(path, settings, overwrite)
        yield path


@contextmanager
def shared_run_folder(folder: str | Path | None, settings: dict, overwrite: bool, rank: int = 0, world: int = 1):
    """`run_folder` for a job of `world` ranks (torchrun) writing one folder: rank 0 holds the lock, judges the
    settings and removes a killed run's temp files; every rank gets its verdict and the folder (rank 0 may be the
    only one that knows it: a timestamped name), so all ranks stop on the same one-line error."""
    from specalign.fsutil import remove_temp_files

    with exclusive(folder) if rank == 0 else nullcontext():
        error = None
        if rank == 0:
            try:
                check_settings(folder, settings, overwrite)
                remove_temp_files(folder)
            except SpecalignError as e:
                error = str(e)
        if world > 1:
            import torch.distributed as dist

            box = [None if folder is None else str(folder), error]
            dist.broadcast_object_list(box, src=0)
            folder, error = box
        if error:
            raise SpecalignError(error)
        yield Path(folder)


def require_positive(name: str, value, minimum=1) -> None:
    """One rule for counts and sizes given on the command line: `--epochs: must be at least 1, got 0`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecalignError(f"--{name.replace('_', '-')}: expected a number, got {value!r}")
    if value < minimum:
        raise SpecalignError(f"--{name.replace('_', '-')}: must be at least {minimum}, got {value}")


LATEST_NAME = "latest"  # a link beside task folders to the newest finished one
BEST_NAME = "best_model"


def resolve_best_model(path: str | Path, is_model, what: str) -> Path:
    """The trained model a path means: a model folder (or file) as is (`is_model(path)`), a task folder's
    best_model/, or, for a folder of task folders, its `latest` task's (else the newest task with a best_model/)."""
    p = Path(path)
    if is_model(p):
        return p
    if not p.is_dir():
        raise fail(p, f"no such {what} (give a best_model/ folder, a task folder or a folder of task folders)")
    if (p / BEST_NAME).is_dir():
        return p / BEST_NAME
    if (p / LATEST_NAME / BEST_NAME).is_dir():
        return (p / LATEST_NAME).resolve() / BEST_NAME
    tasks = sorted(p.glob(f"*/{BEST_NAME}"), key=lambda t: t.stat().st_mtime)
    if not tasks:
        raise fail(p, f"no task folder with a best_model/ here (train a {what} first, or give its best_model/ folder)")
    return tasks[-1]
