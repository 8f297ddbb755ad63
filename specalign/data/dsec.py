"""Raw DSEC sequences: write a miniature one, read a real one, and derive the reference's clip layout from it.

A raw sequence folder `<seq>/` holds

    events/left/events.h5          events/{p,t,x,y}, ms_to_idx, t_offset (Blosc-compressed: needs hdf5plugin)
    images/left/rectified/*.png    RGB frames; sorted names are the image index order
    images/timestamps.txt          one absolute microsecond timestamp per image

`events/t` is uint32 microseconds relative to `t_offset`; image timestamps are absolute (t + t_offset).
`ms_to_idx[ms]` is the first event index with t >= ms * 1000, so t[ms_to_idx[ms] - 1] < ms * 1000.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from specalign.data import layout
from specalign.data.event_npy import EVENT_FIELDS, check_events
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import atomic_path, remove_temp_files, write_bytes, write_json, write_png
from specalign.options import option, parse_size
from specalign.pool import run_resumable
from specalign.runs import require_positive, run_folder

DSEC_SENSOR_SIZE = (640, 480)  # (width, height) of DSEC's Prophesee Gen3.1 event cameras
DEFAULT_QUESTION = "What are the key elements in this scene?"
H5_REL = Path("events/left/events.h5")
IMAGES_REL = Path("images/left/rectified")
TIMESTAMPS_REL = Path("images/timestamps.txt")
BUILD_DIR = ".build"  # per-sequence markers that make build_dsec resumable
_CHUNK = 1 << 15  # events per HDF5 chunk


# ---------------------------------------------------------------------------------------------------- writing


def ms_to_idx(t_rel) -> np.ndarray:
    """uint64 [ceil(t_rel[-1] / 1000) + 1]: first index with t_rel >= ms * 1000, for ms = 0 .. ceil(last / 1000).

    t_rel: sorted relative microseconds [N]. Entries past the last event equal N, as in DSEC.
    """
    t_rel = np.asarray(t_rel, dtype=np.int64)
    last = int(t_rel[-1]) if len(t_rel) else 0
    marks = np.arange(math.ceil(last / 1000) + 1, dtype=np.int64) * 1000
    return np.searchsorted(t_rel, marks, side="left").astype(np.uint64)


def write_raw_sequence(
    seq_dir: str | Path,
    events: dict,
    image_ts,
    frames: list[np.ndarray],
    t_offset: int,
    sensor_size: tuple[int, int],
) -> Path:
    """Write one sequence in DSEC's raw layout; returns seq_dir.

    events: dict x, y (uint16 [N]), t (int64 [N], ABSOLUTE microseconds, sorted), p (uint8 [N] in {0, 1}).
    image_ts: int64 [M] absolute microseconds; frames: M uint8 [H, W, 3]; sensor_size: (width, height).
    The h5 also gets root attrs width/height (real DSEC files lack them; readers default to 640x480).
    """
    seq_dir = Path(seq_dir)
    h5_path = seq_dir / H5_REL
    missing = [k for k in EVENT_FIELDS if k not in events]
    if missing:
        raise fail(h5_path, f"events dict lacks fields {missing}")
    ev = {k: np.asarray(events[k]) for k in EVENT_FIELDS}
    check_events(ev, h5_path, sensor_size)
    t_abs = ev["t"].astype(np.int64)
    t_rel = t_abs - int(t_offset)
    if len(t_rel) and (t_rel[0] < 0 or t_rel[-1] >= 2**32):
        raise fail(h5_path, f"event times do not fit uint32 microseconds after t_offset={int(t_offset)}")
    image_ts = np.asarray(image_ts, dtype=np.int64)
    if len(frames) != len(image_ts):
        raise fail(seq_dir / TIMESTAMPS_REL, f"{len(image_ts)} timestamps but {len(frames)} frames")
    if np.any(np.diff(image_ts) < 0):
        raise fail(seq_dir / TIMESTAMPS_REL, "image timestamps are not sorted")

    def put(f, name, data):
        data = np.ascontiguousarray(data)
        f.create_dataset(
            name,
            data=data,
            chunks=(min(max(len(data), 1), _CHUNK),),
            maxshape=(None,),  # lets an empty stream still be chunked
            **hdf5plugin.Blosc(cname="zstd", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE),
        )

    with atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as f:
        put(f, "events/p", ev["p"].astype(np.uint8))
        put(f, "events/t", t_rel.astype(np.uint32))
        put(f, "events/x", ev["x"].astype(np.uint16))
        put(f, "events/y", ev["y"].astype(np.uint16))
        put(f, "ms_to_idx", ms_to_idx(t_rel))
        f.create_dataset("t_offset", data=np.int64(t_offset))
        f.attrs["width"], f.attrs["height"] = int(sensor_size[0]), int(sensor_size[1])

    for i, img in enumerate(frames):
        write_png(seq_dir / IMAGES_REL / f"{i:06d}.png", np.asarray(img, dtype=np.uint8))
    write_bytes(seq_dir / TIMESTAMPS_REL, "".join(f"{int(t)}\n" for t in image_ts).encode())
    return seq_dir


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class RawSequence:
    """A validated raw sequence. Use as a context manager; the h5 opens on the first events_between()."""

    path: Path
    h5_path: Path
    image_ts: np.ndarray = field(repr=False)  # int64 [M], absolute microseconds
    image_paths: list[Path] = field(repr=False)  # [M], image index order
    sensor_size: tuple[int, int]  # (width, height)
    t_offset: int
    num_events: int
    _h5: h5py.File | None = field(default=None, repr=False)
    _ms_to_idx: np.ndarray | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def __enter__(self) -> RawSequence:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def _file(self) -> h5py.File:
        if self._h5 is None:
            f = _open_h5(self.h5_path)
            try:
                self._ms_to_idx = f["ms_to_idx"][()].astype(np.int64)
            except Exception as e:
                f.close()
                raise fail(self.h5_path, f"cannot read ms_to_idx ({one_line(e)})") from None
            self._h5 = f
        return self._h5

    def events_between(self, t0_abs: int, t1_abs: int) -> dict:
        """Events with t0_abs <= t < t1_abs (absolute microseconds).

        Returns dict x, y (uint16 [K]), t (int64 [K], absolute), p (uint8 [K]). ms_to_idx narrows the read to
        whole milliseconds; searchsorted on that slice finds the exact microsecond boundaries.
        """
        f = self._file()
        table, n = self._ms_to_idx, self.num_events
        t0, t1 = int(t0_abs) - self.t_offset, int(t1_abs) - self.t_offset
        if t1 <= t0 or t1 <= 0 or n == 0:
            return _no_events()
        # lo_ms * 1000 <= t0 and hi_ms * 1000 >= t1, so [i0, i1) holds every event of the window.
        lo_ms = min(max(t0 // 1000, 0), len(table) - 1)
        hi_ms = -(-t1 // 1000)
        i0 = int(table[lo_ms])
        i1 = int(table[hi_ms]) if hi_ms < len(table) else n
        if not 0 <= i0 <= i1 <= n:
            raise fail(self.h5_path, f"ms_to_idx points outside the {n} events (entries {i0}, {i1})")
        # One extra event on each side checks that ms_to_idx agrees with events/t at both ends.
        a, b = max(i0 - 1, 0), min(i1 + 1, n)
        try:
            t_wide = f["events/t"][a:b].astype(np.int64)
            raw = {k: f[f"events/{k}"][i0:i1] for k in ("x", "y", "p")}
        except Exception as e:
            raise fail(self.h5_path, f"cannot read events ({one_line(e)})") from None
        t_slice = t_wide[i0 - a : len(t_wide) - (b - i1)]
        if (i0 > 0 and t_wide[0] >= lo_ms * 1000) or (i1 < n and hi_ms < len(table) and t_wide[-1] < hi_ms * 1000):
            raise fail(self.h5_path, f"ms_to_idx disagrees with events/t near {lo_ms}..{hi_ms} ms")
        raw["t"] = t_slice
        check_events(raw, self.h5_path, self.sensor_size)
        j0 = int(np.searchsorted(t_slice, t0, side="left"))
        j1 = int(np.searchsorted(t_slice, t1, side="left"))
        return {
            "x": raw["x"][j0:j1].astype(np.uint16),
            "y": raw["y"][j0:j1].astype(np.uint16),
            "t": t_slice[j0:j1] + self.t_offset,
            "p": raw["p"][j0:j1].astype(np.uint8),
        }


def _no_events() -> dict:
    return {
        "x": np.zeros(0, np.uint16),
        "y": np.zeros(0, np.uint16),
        "t": np.zeros(0, np.int64),
        "p": np.zeros(0, np.uint8),
    }


def _open_h5(h5_path: Path) -> h5py.File:
    if not h5_path.is_file():
        raise fail(h5_path, "event file not found")
    try:
        return h5py.File(h5_path, "r")
    except Exception as e:
        raise fail(h5_path, f"not a readable HDF5 file ({one_line(e)})") from None


def read_image_timestamps(path: Path) -> np.ndarray:
    """int64 [M] absolute microseconds from images/timestamps.txt (blank lines ignored)."""
    if not path.is_file():
        raise fail(path, "image timestamps file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise fail(path, f"cannot read ({one_line(e)})") from None
    ts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ts.append(int(line.strip()))
        except ValueError:
            raise fail(path, f"line {i} is not an integer microsecond timestamp: {line.strip()[:40]!r}") from None
    ts = np.asarray(ts, dtype=np.int64)
    if np.any(np.diff(ts) < 0):
        raise fail(path, "image timestamps are not sorted")
    return ts


def open_raw_sequence(seq_dir: str | Path, sensor_size: tuple[int, int] | None = None) -> RawSequence:
    """Validate a raw sequence folder and return it (closed; the h5 reopens lazily).

    sensor_size (width, height) overrides the h5's width/height attrs; without either it is 640x480.
    """
    seq_dir = Path(seq_dir)
    h5_path = seq_dir / H5_REL
    with _open_h5(h5_path) as f:
        missing = [k for k in ("events/p", "events/t", "events/x", "events/y", "ms_to_idx", "t_offset") if k not in f]
        if missing:
            raise fail(h5_path, f"missing datasets {missing}")
        for k in ("events/p", "events/t", "events/x", "events/y", "ms_to_idx"):
            if not isinstance(f[k], h5py.Dataset):
                raise fail(h5_path, f"{k} is not a dataset")
            if f[k].dtype.kind not in "iu" + ("b" if k == "events/p" else ""):  # checked here, not coerced later
                raise fail(h5_path, f"{k} has dtype {f[k].dtype}, expected integers")
        lengths = {k: f[f"events/{k}"].shape for k in EVENT_FIELDS}
        if any(len(s) != 1 for s in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
            raise fail(h5_path, f"events/x, y, t, p are not 1-D arrays of one length: {lengths}")
        if f["ms_to_idx"].ndim != 1 or len(f["ms_to_idx"]) == 0:
            raise fail(h5_path, "ms_to_idx is not a non-empty 1-D array")
        try:
            t_offset = int(f["t_offset"][()])
        except Exception as e:
            raise fail(h5_path, f"t_offset is not an integer scalar ({one_line(e)})") from None
        if sensor_size is None:
            if "width" in f.attrs and "height" in f.attrs:
                sensor_size = (int(f.attrs["width"]), int(f.attrs["height"]))
            else:
                sensor_size = DSEC_SENSOR_SIZE
        num_events = lengths["t"][0]

    ts_path = seq_dir / TIMESTAMPS_REL
    image_ts = read_image_timestamps(ts_path)
    image_dir = seq_dir / IMAGES_REL
    # never a dotfile: a killed writer's temp PNG is not a frame
    image_paths = sorted(p for p in image_dir.glob("*.png") if not p.name.startswith(".")) if image_dir.is_dir() else []
    if len(image_paths) != len(image_ts):
        raise fail(ts_path, f"{len(image_ts)} timestamps but {len(image_paths)} PNGs in {image_dir}")
    return RawSequence(
        path=seq_dir,
        h5_path=h5_path,
        image_ts=image_ts,
        image_paths=image_paths,
        sensor_size=(int(sensor_size[0]), int(sensor_size[1])),
        t_offset=t_offset,
        num_events=int(num_events),
    )


# ---------------------------------------------------------------------------------------------------- building


def is_raw_sequence(path: Path) -> bool:
    return (path / "events").is_dir() or (path / "images").is_dir()


def find_sequences(raw_dir: str | Path) -> list[Path]:
    """raw_dir itself when it is a sequence, else its sequence subfolders (e.g. DSEC/train), sorted by name."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise fail(raw_dir, "raw DSEC folder not found")
    if is_raw_sequence(raw_dir):
        return [raw_dir]
    seqs = sorted(p for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and is_raw_sequence(p))
    if not seqs:
        raise fail(raw_dir, "no DSEC sequences found (no events/ or images/ here or in any subfolder)")
    return seqs


def conversations_for(question: str) -> list[dict]:
    return [{"from": "human", "value": "<event>\n" + question}, {"from": "gpt", "value": ""}]


@dataclass
class _Task:
    seq_dir: Path
    out_dir: Path
    split_name: str
    duration: str
    mp4: bool
    sensor_size: tuple[int, int] | None
    question: str

    @property
    def name(self) -> str:
        return self.seq_dir.name


def _build_sequence(task: _Task) -> dict:
    """Write every non-empty clip of one sequence; returns its record (the pool writes it as the marker)."""
    duration_us = layout.parse_duration(task.duration)
    seq = task.seq_dir.name
    entries, skipped = [], []
    with open_raw_sequence(task.seq_dir, task.sensor_size) as raw:
        for window in layout.plan_windows(raw.image_ts, duration_us):
            events = raw.events_between(window.time_start, window.time_end)
            if len(events["t"]) == 0:
                skipped.append(f"{seq}/{window.name}")  # the reference skips these too, leaving a numbering gap
                continue
            paths = [raw.image_paths[i] for i in window.image_indices]
            entries.append(
                layout.write_clip(
                    task.out_dir,
                    task.split_name,
                    seq,
                    window,
                    duration_us,
                    events,
                    frames=paths,
                    frame_names=[p.name for p in paths],
                    sensor_size=raw.sensor_size,
                    conversations=conversations_for(task.question),
                    mp4=task.mp4,
                )
            )
    return {"sequence": seq, "duration": task.duration, "skipped_empty": skipped, "entries": entries}


def _check_record(record: dict, task: _Task, path: Path) -> dict:
    """A finished sequence's marker, checked to be this sequence's."""
    if not isinstance(record.get("entries"), list) or record.get("sequence", task.name) != task.name:
        raise fail(path, f"not the marker of sequence {task.name}; delete it to build the sequence again")
    if record.get("duration") != task.duration:
        raise fail(path, f"built with duration {record.get('duration')!r}, not {task.duration!r}; use another --out")
    return record


def raw_identity(raw: RawSequence) -> dict:
    """What a resumed build checks about a raw sequence: its files' sizes and times, its image count and sensor."""

    def stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    return {
        "events_h5": stamp(raw.h5_path),
        "timestamps": stamp(raw.path / TIMESTAMPS_REL),
        "images": len(raw.image_paths),
        "sensor_size": list(raw.sensor_size),
    }


@dataclass
class DsecBuildConfig:
    raw: str = option(help="a DSEC sequence folder, or a folder of them (e.g. DSEC/train)")
    out: str = option(help="derived split folder to write, e.g. my_egpt_dsec_train_1s (its name is the split's)")
    duration: str = option("1s", help=f"clip duration: {' | '.join(layout.DURATIONS_US)}")
    workers: int = option(1, help="processes building sequences in parallel (the data do not depend on it)")
    sensor_size: tuple[int, int] | None = option(
        None, type=parse_size, metavar="WxH", help="event sensor size (default: from the h5, else 640x480)"
    )
    mp4: bool = option(True, help="write an mp4 copy of each clip's frames")
    overwrite: bool = option(False, help="start over: clear the output folder if it holds a build with other settings")
    question: str = option(DEFAULT_QUESTION, cli=False)  # the human turn of every clip's conversation

    def __post_init__(self):
        """Refuse values that cannot build a split, naming the flag, before anything is read or written."""
        for name in ("raw", "out"):
            if not isinstance(getattr(self, name), str | Path) or not str(getattr(self, name)):
                raise SpecalignError(f"--{name}: expected a folder, got {getattr(self, name)!r}")
        layout.parse_duration(self.duration)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int):
            raise SpecalignError(f"--workers: expected a whole number, got {self.workers!r}")
        require_positive("workers", self.workers, 1)
        if self.sensor_size is not None:
            size = tuple(self.sensor_size) if isinstance(self.sensor_size, list | tuple) else ()
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
                raise SpecalignError(
                    f"--sensor-size: expected two positive whole numbers WxH, got {self.sensor_size!r}"
                )
            self.sensor_size = size
        if not isinstance(self.question, str) or not self.question.strip():
            raise SpecalignError(f"question: expected a non-empty string, got {self.question!r}")


def build_dsec(cfg: DsecBuildConfig, progress: bool = True) -> dict:
    """Derive the reference's clip layout (see layout.py) from raw DSEC sequences; resumable.

    cfg.raw: one sequence folder or a folder of them. cfg.out: the derived split folder; its name is the split
    name. Each finished sequence leaves `out/.build/<seq>.json`; a re-run skips those sequences. Returns a
    summary dict (counts, built/resumed sequences, skipped empty clips, index path).
    """
    duration_us = layout.parse_duration(cfg.duration)
    seq_dirs = find_sequences(cfg.raw)
    identities, windows = {}, 0
    for p in seq_dirs:  # every sequence is checked before anything is written
        with open_raw_sequence(p, cfg.sensor_size) as raw:
            identities[p.name] = raw_identity(raw)
            windows += len(layout.plan_windows(raw.image_ts, duration_us))
    if windows == 0:
        raise fail(cfg.raw, f"no clips: every sequence is shorter than --duration {cfg.duration}")
    settings = {"duration": cfg.duration, "mp4": cfg.mp4, "question": cfg.question, "sequences": identities}
    if cfg.sensor_size is not None:
        settings["sensor_size"] = list(cfg.sensor_size)

    with run_folder(cfg.out, settings, cfg.overwrite) as out_dir:
        remove_temp_files(out_dir)  # what a killed build was writing
        split_name = out_dir.resolve().name
        tasks = [_Task(p, out_dir, split_name, cfg.duration, cfg.mp4, cfg.sensor_size, cfg.question) for p in seq_dirs]
        done = run_resumable(
            _build_sequence,
            tasks,
            marker=lambda t: out_dir / BUILD_DIR / f"{t.name}.json",
            workers=cfg.workers,
            progress=progress,
            desc=f"dsec {split_name}",
            unit="seq",
        )
        records = [
            _check_record(r, t, out_dir / BUILD_DIR / f"{t.name}.json") for t, (r, _) in zip(tasks, done, strict=True)
        ]
        for record, (_, ran) in zip(records, done, strict=True):
            for clip_id in record["skipped_empty"] if ran else []:
                warnings.warn(f"{clip_id}: empty window (no events), skipped", stacklevel=2)
        index = [entry for r in records for entry in r["entries"]]
        if not index:
            raise fail(cfg.raw, f"no clips: every {cfg.duration} window is empty")
        index_path = out_dir / layout.INDEX_NAME
        write_json(index_path, index)
    return {
        "split": split_name,
        "out_dir": str(out_dir),
        "duration": cfg.duration,
        "sequences": len(seq_dirs),
        "built": sorted(t.name for t, (_, ran) in zip(tasks, done, strict=True) if ran),
        "resumed": sorted(t.name for t, (_, ran) in zip(tasks, done, strict=True) if not ran),
        "clips": len(index),
        "skipped_empty": [c for r in records for c in r.get("skipped_empty", [])],
        "index": str(index_path),
    }
