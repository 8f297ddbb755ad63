"""Event clip files: a `.npy` holding a pickled dict (the reference layout), read without running code.

A clip dict has `x, y` (uint16), `t` (int64, absolute microseconds), `p` (uint8 in {0, 1}) and the window
metadata `time_start, time_end, duration_ms, image_timestamp, image_idx, image_indices_in_clip, num_events`.
`np.load(allow_pickle=True)` would execute whatever the pickle names; `load_event_npy` only lets numpy
arrays, dtypes and plain builtins through.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from specalign.errors import fail, one_line
from specalign.fsutil import atomic_path

EVENT_FIELDS = ("x", "y", "t", "p")

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
}


class _Refused(pickle.UnpicklingError):
    """The pickle names something other than numpy arrays and plain values."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module in ("numpy.dtypes",) and name.endswith("DType"):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def load_event_npy(path: str | Path, validate: bool = True) -> dict:
    """Read an event clip `.npy` (pickled dict or structured array) without executing code.

    Returns a dict with at least x, y, t, p as 1-D numpy arrays of equal length.
    """
    path = Path(path)
    if not path.is_file():
        raise fail(path, "event file not found")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                obj = _SafeUnpickler(io.BufferedReader(f)).load()
                if isinstance(obj, np.ndarray) and obj.shape == ():
                    obj = obj.item()
            else:
                f.seek(0)
                obj = np.load(f, allow_pickle=False)
    except _Refused as e:
        raise fail(path, f"unsafe pickle: refusing to load {e} (only numpy arrays and plain values)") from None
    except Exception as e:  # truncated / not an npy at all / a damaged pickle
        raise fail(path, f"corrupt or truncated .npy ({type(e).__name__}: {one_line(e)})") from None
    if isinstance(obj, np.ndarray) and obj.dtype.names:
        obj = {k: obj[k] for k in obj.dtype.names}
    if not isinstance(obj, dict):
        raise fail(path, f"expected a dict of event arrays, found {type(obj).__name__}")
    missing = [k for k in EVENT_FIELDS if k not in obj]
    if missing:
        raise fail(path, f"missing event fields {missing}")
    if validate:
        check_events(obj, path)
    return obj


def check_events(ev: dict, path, sensor_size: tuple[int, int] | None = None) -> None:
    """Raise a one-line error if the stream is malformed: x, y, t, p must be 1-D integer arrays of one length
    (p may be bool), t sorted, p in {0, 1}, x and y non-negative (and inside sensor_size, (width, height)).
    Nothing is coerced: a float or object array is refused, not rounded."""
    for k in EVENT_FIELDS:
        a = ev[k]
        if not isinstance(a, np.ndarray):
            raise fail(path, f"event field {k!r} is a {type(a).__name__}, not an array")
        if a.ndim != 1:
            raise fail(path, f"event field {k!r} has shape {a.shape}, expected one dimension")
        if a.dtype.kind not in ("iu" + ("b" if k == "p" else "")):
            raise fail(path, f"event field {k!r} has dtype {a.dtype}, expected integers")
    n = len(ev["t"])
    if any(len(ev[k]) != n for k in EVENT_FIELDS):
        raise fail(path, "event fields x, y, t, p have different lengths")
    if n and not np.all(np.diff(ev["t"].astype(np.int64)) >= 0):
        raise fail(path, "event timestamps are not sorted")
    if n and not np.isin(np.unique(ev["p"]), (0, 1)).all():
        raise fail(path, "polarity values other than 0/1")
    if n and (int(ev["x"].min()) < 0 or int(ev["y"].min()) < 0):
        raise fail(path, "negative event coordinates")
    if sensor_size is not None and n:
        w, h = sensor_size
        if int(ev["x"].max()) >= w or int(ev["y"].max()) >= h:
            raise fail(path, f"events outside the {w}x{h} sensor")


def save_event_npy(path: str | Path, clip: dict) -> None:
    """Write a clip dict as the reference does (`np.save` of a dict), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, clip, allow_pickle=True)
