"""`specalign world build`: simulate drives and write them in the reference study's derived layout.

A drive (sequence) is one scene seen for (clips + 1) * D / 2 seconds. The scene is rendered on a time grid;
each render feeds the event simulator (luminance) and, inside a frame's exposure window, the frame's
exposure average (RGB). Windows of D with 50% overlap are then cut from the sequence exactly as the DSEC
builder cuts real recordings (`data.layout.plan_windows`), and written through the same clip writer.
Every sequence has its own seed, so builds are reproducible whatever the number of workers, and a finished
sequence leaves a marker in `<split>/.build/`, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from specalign.data.layout import (
    DURATIONS_US,
    INDEX_NAME,
    VIDEO_FPS,
    EncodedFrame,
    parse_duration,
    plan_windows,
    split_dir_name,
    write_clip,
)
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import ensure_dir, png_bytes, read_json, remove_temp_files, write_json
from specalign.options import option
from specalign.pool import run_resumable
from specalign.runs import LOCK_FILE, SETTINGS_FILE, check_settings, exclusive, require_positive
from specalign.world.camera import FrameCameraConfig, expose, exposure_window
from specalign.world.events import EventCameraConfig, EventSimulator
from specalign.world.qa import QUESTIONS, all_answers, question_counts
from specalign.world.render import RENDER_VERSION, render
from specalign.world.scene import Scene, sample_scene
from specalign.world.tokenizer import save_tokenizer, train_tokenizer

TOWNS = ("zurich_city", "interlaken", "thun")
RENDER_HZ = {"stopped": 100, "slow": 200, "fast": 200}  # must divide into the 20 Hz frame grid
NOISE_SCALE = {"day": 1.0, "dusk": 2.0, "night": 5.0}  # background activity rises in the dark
SPLIT_IDS = {"train": 0, "test": 1}
MAX_SENSOR_SIDE = 2048
BUILD_DIR = ".build"  # a finished drive's marker: <split>/.build/<seq>.json
RAW_DIR = "raw_dsec"
WORLD_JSON = "world.json"


@dataclass
class WorldConfig:
    out: str = option(help="output folder (resumes if it holds a partial build of the same settings)")
    duration: str = option("1s", help=f"clip duration: {' | '.join(DURATIONS_US)}")
    train: int = option(5208, help="train clips (5208 is the reference's 1 s size)")
    test: int = option(1100, help="test clips")
    seed: int = option(0, help="seed of the whole world (each drive draws from its own stream of it)")
    workers: int = option(2, help="processes building drives in parallel (the data do not depend on it)")
    width: int = option(128, cli=False)  # the event sensor; the RGB frames too unless frame_scale > 1
    height: int = option(96, cli=False)
    # RGB frames at frame_scale x the event sensor's size (DSEC's RGB camera has 1440x1080 pixels to its event
    # camera's 640x480); the events stay what a frame_scale 1 world of the same seed gives
    frame_scale: int = option(1, help="RGB frames at this multiple of the event sensor's size (DSEC's RGB camera "
                                      "has more pixels than its event camera); the events do not change")  # fmt: skip
    clips_per_sequence: int = option(8, help="50%% overlap clips cut from one drive")
    raw_dsec: bool = option(False, help="also write raw DSEC-layout sequences (events.h5, ...)")
    mp4: bool = option(True, help="write an mp4 copy of each clip's frames")
    tokenizer: str | None = option(None, help="reuse this tokenizer.json (e.g. a bundled model's) instead of "
                                              "training one")  # fmt: skip
    overwrite: bool = option(False, help="start over: clear the splits if they hold a build with other settings")
    event: EventCameraConfig = field(default_factory=EventCameraConfig)
    frame: FrameCameraConfig = field(default_factory=FrameCameraConfig)

    def __post_init__(self):
        """Refuse values that cannot build a world, naming the flag, before anything is written."""
        if not isinstance(self.out, str | Path) or not str(self.out):
            raise SpecalignError(f"--out: expected an output folder, got {self.out!r}")
        parse_duration(self.duration)
        for name, minimum in (("train", 0), ("test", 0), ("seed", 0), ("workers", 1), ("clips_per_sequence", 1)):
            whole_number(name, getattr(self, name), minimum)
        if self.train == 0 and self.test == 0:
            raise SpecalignError("--train/--test: both are 0, nothing to build")
        for v in (self.width, self.height):
            if isinstance(v, bool) or not isinstance(v, int) or v % 2 or not 16 <= v <= MAX_SENSOR_SIDE:
                raise SpecalignError(f"--sensor-size {self.width}x{self.height}: need even sizes of 16 to "
                                     f"{MAX_SENSOR_SIDE}")  # fmt: skip
        whole_number("frame_scale", self.frame_scale, 1)
        if self.frame_scale > 8:
            raise SpecalignError(f"--frame-scale: choose 1 to 8, got {self.frame_scale}")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise SpecalignError(f"--tokenizer: {self.tokenizer}: file not found")
        self.event.width, self.event.height = self.width, self.height

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the RGB frames."""
        return self.width * self.frame_scale, self.height * self.frame_scale

    def settings(self) -> dict:
        """What must match for a resumed build to continue the same data."""
        d = asdict(self)
        for k in ("out", "workers", "tokenizer", "overwrite"):  # none of them changes a clip
            d.pop(k)
        if d["frame_scale"] == 1:  # worlds built before frame_scale existed resume unchanged
            d.pop("frame_scale")
        d["render_version"] = RENDER_VERSION
        return d


@dataclass
class SequenceTask:
    split: str
    index: int
    n_clips: int
    name: str


def whole_number(name: str, value, minimum: int) -> None:
    """`--train: must be at least 0, got -5`; `--seed: expected a whole number, got 1.5`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecalignError(f"--{name.replace('_', '-')}: expected a whole number, got {value!r}")
    require_positive(name, value, minimum)


def sequence_name(split: str, j: int) -> str:
    return f"{TOWNS[j % len(TOWNS)]}_{j // len(TOWNS):02d}_{'a' if split == 'train' else 'b'}"


def plan_sequences(split: str, n_clips: int, per_seq: int) -> list[SequenceTask]:
    tasks, j = [], 0
    while n_clips > 0:
        k = min(per_seq, n_clips)
        tasks.append(SequenceTask(split, j, k, sequence_name(split, j)))
        n_clips -= k
        j += 1
    return tasks


def simulate_sequence(scene: Scene, seconds: float, cfg: WorldConfig, rng: np.random.Generator):
    """Render the drive, run both cameras.

    Returns (events dict with t in us from the start, image timestamps int64 [N] in us, frames list of
    uint8 [H, W, 3]).
    """
    frame_step_us = int(1e6 / VIDEO_FPS)
    render_step_us = int(1e6 / RENDER_HZ[scene.ego])
    image_ts = np.arange(0, int(round(seconds * 1e6)) + 1, frame_step_us, dtype=np.int64) + frame_step_us
    windows = [exposure_window(scene, ts * 1e-6) for ts in image_ts]
    sums = [None] * len(image_ts)
    counts = [0] * len(image_ts)
    sim = EventSimulator(cfg.event, rng, noise_hz=cfg.event.noise_hz * NOISE_SCALE[scene.time_of_day])
    grid = np.arange(0, int(image_ts[-1] + render_step_us), render_step_us, dtype=np.int64)
    first = 0
    for t_us in grid.tolist():
        t = t_us * 1e-6
        img = render(scene, t, cfg.width, cfg.height, 4)
        rgb = img[..., :3] if cfg.frame_scale == 1 else None  # larger frames: rendered apart, only when exposed
        sim.step(t_us, img[..., 3])
        while first < len(windows) and windows[first][1] < t - 1e-9:
            first += 1
        for i in range(first, len(windows)):
            lo, hi = windows[i]
            if lo - 1e-9 > t:
                break
            if t <= hi + 1e-9:
                if rgb is None:
                    rgb = render(scene, t, *cfg.frame_size, 3)
                sums[i] = rgb.copy() if sums[i] is None else sums[i] + rgb
                counts[i] += 1
    frames = []
    for i, ts in enumerate(image_ts.tolist()):
        if sums[i] is None:  # exposure shorter than the render step: take the render at the timestamp
            sums[i], counts[i] = render(scene, ts * 1e-6, *cfg.frame_size, 3), 1
        frames.append(expose(sums[i] / counts[i], scene, cfg.frame, rng))
    return sim.events(), image_ts, frames


def clip_frames(scene: Scene, cfg: WorldConfig, rng: np.random.Generator, n: int = 8, window: int = 0) -> np.ndarray:
    """The n frames a model sees of a drive's clip number `window`, uint8 [n, H, W, 3], without the event camera.

    Renders only inside those frames' exposure windows, on simulate_sequence's render grid with its rule for
    which renders a frame averages, so the frames come from the same distribution as a built world's (only
    the noise draws differ): 1-9 renders a frame instead of a whole drive at 100-200 Hz. Feeds train-mini's
    fresh scenes.
    """
    from specalign.data.dataset import pick_frames

    frame_step_us = int(1e6 / VIDEO_FPS)
    render_step_us = int(1e6 / RENDER_HZ[scene.ego])
    duration_us = parse_duration(cfg.duration)
    start = frame_step_us + window * (duration_us // 2)  # plan_windows: 50 % overlap from the first frame
    image_ts = np.arange(start, start + duration_us, frame_step_us)
    frames = []
    for ts in image_ts[pick_frames(len(image_ts), n)].tolist():
        lo, hi = exposure_window(scene, ts * 1e-6)
        ks = range(int(np.floor(lo * 1e6 / render_step_us)), int(np.ceil(hi * 1e6 / render_step_us)) + 1)
        times = [k * render_step_us * 1e-6 for k in ks if k >= 0]
        times = [t for t in times if lo - 1e-9 <= t <= hi + 1e-9] or [ts * 1e-6]
        radiance = sum(render(scene, t, *cfg.frame_size, 3) for t in times) / len(times)
        frames.append(expose(radiance, scene, cfg.frame, rng))
    return np.stack(frames)


def build_sequence(task: SequenceTask, cfg: WorldConfig) -> dict:
    """Simulate one drive and write its clips (and its raw DSEC copy); returns its record (the pool's marker)."""
    split_name = split_dir_name(task.split, cfg.duration)
    root = Path(cfg.out) / split_name
    duration_us = parse_duration(cfg.duration)
    rng = np.random.default_rng([cfg.seed, SPLIT_IDS[task.split], task.index])
    scene = sample_scene(rng)
    seconds = (task.n_clips + 1) * duration_us / 2 / 1e6
    events, image_ts, frames = simulate_sequence(scene, seconds, cfg, rng)
    t_offset = 50_000_000_000 + 1_000_000_000 * task.index  # DSEC-like absolute clock (us)
    events["t"] = events["t"] + t_offset
    image_ts = image_ts + t_offset
    qa = all_answers(scene)
    weights = np.array([c["count"] for c in question_counts()], dtype=np.float64)
    encoded = [EncodedFrame(f, png_bytes(f)) for f in frames]
    entries = []
    windows = plan_windows(image_ts, duration_us)
    assert len(windows) == task.n_clips, (len(windows), task.n_clips)
    for w in windows:
        a, b = np.searchsorted(events["t"], [w.time_start, w.time_end], side="left")
        clip_events = {k: events[k][a:b] for k in ("x", "y", "t", "p")}
        q = int(rng.choice(len(QUESTIONS), p=weights / weights.sum()))
        conversations = [
            {"from": "human", "value": "<event>\n" + qa[q]["question"]},
            {"from": "gpt", "value": qa[q]["target"]},
        ]
        entry = write_clip(
            root, split_name, task.name, w, duration_us, clip_events,
            frames=[encoded[i] for i in w.image_indices],
            frame_names=[f"{i:06d}.png" for i in w.image_indices],
            sensor_size=(cfg.width, cfg.height), conversations=conversations, mp4=cfg.mp4,
        )  # fmt: skip
        truth = {
            "sequence": task.name,
            "clip": w.name,
            "window_us": [w.time_start, w.time_end],
            "scene": scene.to_dict(),
            "qa": qa,
        }
        write_json(root / "scene" / task.name / f"{w.name}.json", truth, indent=1)
        entries.append(entry)
    if cfg.raw_dsec:
        from specalign.data.dsec import write_raw_sequence

        raw = Path(cfg.out) / RAW_DIR / task.split / task.name
        write_raw_sequence(raw, events, image_ts, frames, t_offset, (cfg.width, cfg.height))
    texts = sorted({a["target"] for a in qa} | {a["draft"] for a in qa})
    return {"sequence": task.name, "entries": entries, "texts": texts}


def build_world(cfg: WorldConfig, progress: bool = True) -> dict:
    """Build (or resume) both splits; returns a summary dict.

    A re-run with the same settings resumes (finished drives are kept); with other settings it stops on one line
    naming the first difference, unless cfg.overwrite, which clears this duration's splits and starts over.
    """
    started = time.time()
    given = given_tokenizer(cfg.tokenizer, []) if cfg.tokenizer else None  # a bad file fails before any work
    settings = _jsonable(cfg.settings())
    with exclusive(cfg.out) as out:
        _check_world_folder(out, cfg)
        splits = [(split, out / split_dir_name(split, cfg.duration)) for split in ("train", "test")]
        split_roots = [root for _, root in splits]
        for root in split_roots:
            _start_split(root, settings, cfg.overwrite)
        if cfg.raw_dsec and check_settings(ensure_dir(out / RAW_DIR), settings, cfg.overwrite):
            for root in split_roots:  # the raw copies are new: drives finished before must be written again
                for marker in (root / BUILD_DIR).glob("*.json"):
                    marker.unlink()
        for folder in [*split_roots, out / RAW_DIR]:  # a killed build's half-written files
            remove_temp_files(folder)
        remove_temp_files(out, recursive=False)

        tasks = plan_sequences("train", cfg.train, cfg.clips_per_sequence)
        tasks += plan_sequences("test", cfg.test, cfg.clips_per_sequence)
        done = run_resumable(
            partial(build_sequence, cfg=cfg), tasks, marker=partial(_marker_path, cfg), workers=cfg.workers,
            progress=progress, desc="world build", unit="clip", size=lambda t: t.n_clips,
        )  # fmt: skip

        summary = {"out": str(out), "duration": cfg.duration, "seed": cfg.seed, "splits": {}}
        texts = set()
        for split, root in splits:
            entries = []
            for t, (record, _) in zip(tasks, done, strict=True):
                if t.split == split:
                    entries += _check_record(record, t, _marker_path(cfg, t))
                    if split == "train":
                        texts.update(record["texts"])
            write_json(root / INDEX_NAME, entries)
            summary["splits"][split] = {"dir": root.name, "clips": len(entries),
                                        "sequences": sum(1 for t in tasks if t.split == split)}  # fmt: skip
        write_json(out / "questions.json", question_counts())
        if given is not None:
            tok = given_tokenizer(cfg.tokenizer, texts)
        else:
            tok = train_tokenizer(texts, [q for q, _ in QUESTIONS])
        save_tokenizer(tok, out / "tokenizer.json")
        summary["vocab_size"] = tok.get_vocab_size()
        summary["seconds"] = round(time.time() - started, 1)
        # one world folder can hold several durations; world.json keeps a record of each
        manifest = read_json(out / WORLD_JSON) if (out / WORLD_JSON).exists() else {}
        manifest["sensor_size"] = [cfg.width, cfg.height]
        manifest.setdefault("builds", {})[cfg.duration] = {"settings": settings, "summary": summary}
        write_json(out / WORLD_JSON, manifest)
    return summary


def _check_world_folder(out: Path, cfg: WorldConfig) -> None:
    """Refuse a folder that is not a world (a world is only ever cleared split by split), and a world whose
    other durations have another sensor size (its world.json holds one size for all)."""
    own = {LOCK_FILE, WORLD_JSON, "questions.json", "tokenizer.json", RAW_DIR}
    names = {p.name for p in out.iterdir()}
    if names - own and not (WORLD_JSON in names or any(n.startswith("my_egpt_dsec_") for n in names)):
        raise fail(out, "is not empty and holds no world; use an empty or new --out")
    if WORLD_JSON not in names:
        return
    manifest = read_json(out / WORLD_JSON)
    size = manifest.get("sensor_size") if isinstance(manifest, dict) else None
    others = set(manifest.get("builds") or {}) - {cfg.duration} if isinstance(manifest, dict) else set()
    if others and size is not None and list(size) != [cfg.width, cfg.height]:
        raise fail(out, f"its {', '.join(sorted(others))} build has the sensor size {size[0]}x{size[1]}, not "
                        f"{cfg.width}x{cfg.height}; use another --out")  # fmt: skip


def _start_split(root: Path, settings: dict, overwrite: bool) -> None:
    """Make `root` hold this build's settings: fresh, resumed, or (overwrite) cleared; else refuse on one line."""
    ensure_dir(root)
    current, legacy = root / SETTINGS_FILE, root / BUILD_DIR / "settings.json"  # legacy: splits of older builds
    old = read_json(current) if current.is_file() else read_json(legacy) if legacy.is_file() else None
    if old is None:
        check_settings(root, settings, overwrite)
        return
    version = old.get("render_version", 1) if isinstance(old, dict) else None  # before it was recorded: 1
    if version != RENDER_VERSION and not overwrite:
        raise fail(root, f"this split was drawn by an older renderer (version {version}, now {RENDER_VERSION}); "
                         "pass --overwrite to rebuild it, or use another --out")  # fmt: skip
    if not current.is_file():
        write_json(current, old)
    check_settings(root, settings, overwrite)


def _check_record(record: dict, task: SequenceTask, path: Path) -> list[dict]:
    """A finished drive's index entries, after checking its marker holds what this drive writes."""
    entries, texts = record.get("entries"), record.get("texts")
    if not (isinstance(entries, list) and isinstance(texts, list)) or record.get("sequence") != task.name:
        raise fail(path, f"not the marker of drive {task.name}; delete it to build the drive again")
    if len(entries) != task.n_clips:
        raise fail(path, f"lists {len(entries)} clips, the drive has {task.n_clips}; delete it to build it again")
    return entries


def load_world_config(world: str | Path, duration: str) -> WorldConfig:
    """The WorldConfig a world was built with (its sizes and camera settings), from its world.json."""
    path = Path(world) / "world.json"
    try:
        settings = dict(read_json(path)["builds"][duration]["settings"])
    except (OSError, ValueError, KeyError):
        raise SpecalignError(f"{path}: no {duration} build settings (build it with `specalign world build`)") from None
    if settings.pop("render_version", 1) != RENDER_VERSION:  # fresh scenes would not look like its clips
        raise SpecalignError(f"{path}: drawn by an older renderer (now version {RENDER_VERSION}); rebuild the world")
    settings["frame"] = FrameCameraConfig(**settings["frame"])
    settings["event"] = EventCameraConfig(**settings["event"])
    return WorldConfig(out=str(world), **settings)


def given_tokenizer(path: str, texts):
    """A tokenizer.json to reuse (so models trained on another world keep their vocabulary); every answer of this
    world must encode without <unk>."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # missing file, not a tokenizer
        raise SpecalignError(f"{path}: cannot read a tokenizer ({one_line(e, 120)})") from None
    unk = tok.token_to_id("<unk>")
    for text in sorted(texts):
        if unk is not None and unk in tok.encode(text).ids:
            raise SpecalignError(f"{path}: this tokenizer cannot encode the answer {text[:60]!r}... without <unk>")
    return tok


def _marker_path(cfg: WorldConfig, t: SequenceTask) -> Path:
    return Path(cfg.out) / split_dir_name(t.split, cfg.duration) / BUILD_DIR / f"{t.name}.json"


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj))
