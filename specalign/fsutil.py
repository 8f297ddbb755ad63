"""Writes that never leave a half-written file: write to a temp file beside the target, then rename."""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from specalign.errors import fail

_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_dir(path: str | Path) -> Path:
    """mkdir -p with a one-line error when the place cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail(path, f"cannot create directory ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise fail(path, "directory is not writable")
    return path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path in the same directory; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished files get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\.[^.]*)?")  # atomic_path's `.<name>.<random>.tmp<suffix>`


def remove_temp_files(folder: str | Path, recursive: bool = True) -> int:
    """Delete the temp files a killed writer left in `folder` (call it holding the folder's lock). Returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in (folder.rglob(".*") if recursive else folder.glob(".*")) if TEMP_NAME.fullmatch(p.name)]
    for p in stale:
        if p.is_file():
            p.unlink()
    return len(stale)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# a JSON array of numbers only, spread over lines by indent
_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def write_json(path: str | Path, obj, indent: int | None = 2, flat_numbers: bool = False) -> None:
    """obj as JSON, atomically. flat_numbers: arrays of numbers on one line each (traces stay readable and small)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    if flat_numbers:
        text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    write_bytes(path, (text + "\n").encode())


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise fail(path, "file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(path, f"not valid JSON ({e})") from None


def png_bytes(image) -> bytes:
    """PNG encoding of an HxWx3 (or HxW) uint8 array. Same array -> same bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_png(path: str | Path, image) -> None:
    """Write an HxWx3 (or HxW) uint8 array as PNG, atomically."""
    write_bytes(path, png_bytes(image))


def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure written atomically as a PNG (a reader never sees half an image), then closed."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)
