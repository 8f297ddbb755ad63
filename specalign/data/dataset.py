"""The Data API: every later stage reads a derived split folder (see layout.py) through `open_dataset`.

`ds = open_dataset(split_dir)`; `s = ds[i]`; then `s.frames(8)` gives uint8 [8, H, W, 3], the RGB frames the
target model sees, `s.event_images(5)` uint8 [5, h, w, 3], the event images the draft model sees, and
`s.question`, `s.answer`, `s.ground_truth()` the text side.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from specalign.data.event_image import event_images as compute_event_images
from specalign.data.event_npy import load_event_npy
from specalign.data.layout import INDEX_NAME
from specalign.errors import fail
from specalign.fsutil import read_json

EVENT_PREFIX = "<event>\n"
_EVENT_IMAGE_KEYS = {5: ("event_image", "event_image"), 1: ("event_image_1f", "event_image_1f")}  # n -> (key, dir)


def pick_frames(m: int, n: int) -> np.ndarray:
    """int [n]: n frame indices spread evenly over m frames, first and last included."""
    return np.linspace(0, m - 1, n).round().astype(int)


def load_png(path: str | Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise fail(path, "image not found")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as e:
        raise fail(path, f"unreadable image ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _plain_name(name) -> bool:
    """A data file's name: no folder part, not hidden (temp files of the atomic writer start with a dot)."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _stack(images: list[np.ndarray], where) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise fail(where, f"images of different sizes {sorted(shapes)}")
    return np.stack(images)


@dataclass
class Sample:
    """One clip of a derived split: its index entry plus lazy loaders for its files."""

    id: str  # "<seq>/<clip>"
    seq: str
    clip: str  # "000012"
    split: str
    entry: dict = field(repr=False)  # the raw index entry
    root: Path = field(repr=False)  # the split folder
    dataset: Dataset | None = field(default=None, repr=False, compare=False)  # sizes computed event images

    @property
    def sensor_size(self) -> tuple[int, int] | None:
        """(width, height) of the event camera (the dataset's), or None for a free-standing Sample."""
        return self.dataset.sensor_size if self.dataset is not None else None

    @property
    def event_path(self) -> Path:
        return self.root / "event_npy" / self.entry.get("event_data", f"{self.id}.npy")

    @property
    def video_dir(self) -> Path:
        return self.root / "video" / self.entry.get("video_data", self.id)

    def events(self) -> dict:
        """The clip's event dict: x, y (uint16 [N]), t (int64 [N], absolute us), p (uint8 [N]) + window metadata."""
        return load_event_npy(self.event_path)

    def event_images(self, n: int = 5) -> np.ndarray:
        """uint8 [n, H, W, 3] for n in {5, 1}: the stored PNGs, or computed from the events when they are missing."""
        if n not in _EVENT_IMAGE_KEYS:
            raise fail(self.id, f"event_images(n={n}): n must be 5 or 1")
        key, folder = _EVENT_IMAGE_KEYS[n]
        rel = self.entry.get(key) or []
        rel = [rel] if isinstance(rel, str) else list(rel)
        paths = [self.root / folder / r for r in rel]
        if len(paths) == n and all(p.is_file() for p in paths):
            return _stack([load_png(p) for p in paths], self.root / folder / self.seq)
        return np.stack(compute_event_images(self.events(), n, self.sensor_size, path=self.event_path))

    def frame_paths(self) -> list[Path]:
        """The clip's RGB frame PNGs in time order: the names its index entry lists (`video_frames`), else the
        folder's PNGs (never a dotfile, such as a killed writer's temp file) when there are as many as its event
        file's `image_indices_in_clip`. A clip with missing frames is refused: fewer frames, another answer."""
        names = self.entry.get("video_frames")
        if names is not None:
            if not isinstance(names, list) or not all(_plain_name(n) for n in names):
                raise fail(self.root / INDEX_NAME, f"{self.id}: video_frames must be a list of file names")
            paths = [self.video_dir / n for n in names]
            missing = [p.name for p in paths if not p.is_file()]
            if missing:
                listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
                raise fail(self.video_dir, f"{len(missing)} of the clip's {len(paths)} frames are missing ({listed})")
            return paths
        paths = [p for p in self.video_dir.glob("*.png") if _plain_name(p.name)] if self.video_dir.is_dir() else []
        if paths:  # a layout without video_frames: the clip's event file says how many frames it has
            expected = self.events().get("image_indices_in_clip")
            if isinstance(expected, list | np.ndarray) and len(expected) != len(paths):
                raise fail(self.video_dir, f"{len(paths)} frames, but the clip has {len(expected)} "
                                           f"(image_indices_in_clip of {self.event_path.name})")  # fmt: skip
        return sorted(paths)

    def frames(self, n: int = 8) -> np.ndarray:
        """uint8 [n, H, W, 3]: n frames picked evenly (pick_frames) over the clip's m frames."""
        paths = self.frame_paths()
        if not paths:
            raise fail(self.video_dir, "clip has no RGB frames")
        return _stack([load_png(paths[i]) for i in pick_frames(len(paths), n)], self.video_dir)

    def _turn(self, speaker: str) -> str:
        for turn in self.entry.get("conversations") or []:
            if isinstance(turn, dict) and turn.get("from") == speaker:
                return str(turn.get("value", ""))
        return ""

    @property
    def conversations(self) -> list[dict]:
        return list(self.entry.get("conversations") or [])

    @property
    def question(self) -> str:
        """The first human turn without EventGPT's leading "<event>\\n"."""
        return self._turn("human").removeprefix(EVENT_PREFIX)

    @property
    def answer(self) -> str:
        """The first gpt turn ("" in freshly built splits)."""
        return self._turn("gpt")

    def ground_truth(self) -> dict | None:
        """`<root>/scene/<seq>/<clip>.json` ({"scene": ..., "qa": [...]}) from the world builder; None if absent."""
        path = self.root / "scene" / self.seq / f"{self.clip}.json"
        if not path.is_file():
            return None
        gt = read_json(path)
        if not isinstance(gt, dict):
            raise fail(path, f"ground truth is not a JSON object but {type(gt).__name__}")
        return gt


@dataclass
class Dataset:
    """A derived split folder and its index. `ds[i]` -> Sample; iterating yields every Sample in index order."""

    root: Path
    split_name: str
    entries: list[dict] = field(repr=False)
    world_root: Path | None = None  # the parent folder when it holds questions.json (a built world)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Sample:
        i, n = operator.index(i), len(self.entries)
        if not -n <= i < n:
            raise fail(self.root / INDEX_NAME, f"sample {i} out of range: the split has {n} clips")
        entry = self.entries[i]
        seq, clip = entry["id"].rsplit("/", 1)
        return Sample(entry["id"], seq, clip, entry.get("split", self.split_name), entry, self.root, self)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def questions(self) -> list[dict]:
        """[{question, count}] from `<world_root>/questions.json`; [] when there is no world or no file."""
        path = self.world_root / "questions.json" if self.world_root else None
        if path is None or not path.is_file():
            return []
        data = read_json(path)
        items = data.get("questions") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise fail(path, "expected a list of {question, count}")
        out = []
        for k, item in enumerate(items):
            if isinstance(item, str):
                item = {"question": item, "count": 0}
            if not isinstance(item, dict) or not isinstance(item.get("question"), str):
                raise fail(path, f"item {k} is not a {{question, count}} object")
            out.append({"question": item["question"], "count": int(item.get("count", 0))})
        return out

    @cached_property
    def sensor_size(self) -> tuple[int, int]:
        """(width, height): world.json's sensor_size, else the first clip's event image size, else its events'
        extent (max x + 1, max y + 1, as EventGPT sizes images)."""
        world_json = self.world_root / "world.json" if self.world_root else None
        if world_json is not None and world_json.is_file():
            meta = read_json(world_json)
            size = meta.get("sensor_size") if isinstance(meta, dict) else None
            if isinstance(size, dict):
                size = [size.get("width"), size.get("height")]
            if size is not None:
                if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
                    raise fail(world_json, f"sensor_size must be [width, height], found {size!r}")
                return size[0], size[1]
        if not self.entries:
            raise fail(self.root / INDEX_NAME, "empty index: cannot tell the sensor size")
        first = self.entries[0]
        rel = first.get("event_image_1f") or first.get("event_image")
        rel = rel if isinstance(rel, str) else (rel[0] if rel else None)
        if rel:
            folder = "event_image_1f" if first.get("event_image_1f") else "event_image"
            png = self.root / folder / rel
            if png.is_file():
                h, w = load_png(png).shape[:2]
                return w, h
        seq, clip = first["id"].rsplit("/", 1)
        ev = load_event_npy(self.root / "event_npy" / first.get("event_data", f"{seq}/{clip}.npy"))
        if len(ev["x"]) == 0:
            raise fail(self.root / "event_npy" / first.get("event_data", ""), "no events: cannot tell the sensor size")
        return int(ev["x"].max()) + 1, int(ev["y"].max()) + 1


def open_dataset(path: str | Path) -> Dataset:
    """Open a derived split folder (it holds EventGPT_Instruction_Subset.json) and check its index."""
    root = Path(path)
    index_path = root / INDEX_NAME
    if not root.is_dir():
        raise fail(root, "dataset folder not found")
    entries = read_json(index_path)
    if not isinstance(entries, list):
        raise fail(index_path, f"index must be a JSON list of clip entries, found {type(entries).__name__}")
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("id"), str) or "/" not in e["id"]:
            raise fail(index_path, f"entry {k} has no 'id' of the form '<seq>/<clip>'")
    root = root.resolve()
    world_root = root.parent if (root.parent / "questions.json").is_file() else None
    return Dataset(root=root, split_name=root.name, entries=entries, world_root=world_root)
