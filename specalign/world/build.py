"""`specalign world build`: simulate drives and write them in the reference study's derived layout.

A drive (sequence) is one scene seen for (clips + 1) * D / 2 seconds. The scene is rendered on a time grid;
each render feeds the event simulator (luminance) and, inside a frame's exposure window, the frame's
exposure average (RGB). Windows of D with 50% overlap are then cut from the sequence exactly as the DSEC
builder cuts real recordings (`data.layout.plan_windows`), and written through the same clip writer.
Every sequence has its own seed, so builds are reproducible whatever the number of workers, and a finished
sequence leaves a marker in `<split>/.build/`, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

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
from specalign.errors import SpecalignError
from specalign.fsutil import ensure_dir, png_bytes, read_json, write_json
from specalign.options import option
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
        parse_duration(self.duration)
        self.event.width, self.event.height = self.width, self.height
        if self.width % 2 or self.height % 2 or self.width < 16 or self.height < 16:
            raise SpecalignError(f"frame size {self.width}x{self.height}: need even sizes of at least 16")
        if not 1 <= self.frame_scale <= 8:
            raise SpecalignError(f"--frame-scale {self.frame_scale}: choose 1 to 8")

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
    """Simulate one drive and write its clips (and its raw DSEC copy); returns its marker."""
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

        raw = Path(cfg.out) / "raw_dsec" / task.split / task.name
        write_raw_sequence(raw, events, image_ts, frames, t_offset, (cfg.width, cfg.height))
    texts = sorted({a["target"] for a in qa} | {a["draft"] for a in qa})
    marker = {"sequence": task.name, "entries": entries, "texts": texts}
    write_json(root / ".build" / f"{task.name}.json", marker, indent=None)
    return marker


def _worker(args):
    task, cfg = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return build_sequence(task, cfg)


def build_world(cfg: WorldConfig, progress: bool = True) -> dict:
    """Build (or resume) both splits; returns a summary dict."""
    started = time.time()
    given = given_tokenizer(cfg.tokenizer, []) if cfg.tokenizer else None  # a bad file fails before any work
    out = ensure_dir(cfg.out)
    tasks = []
    for split, n in (("train", cfg.train), ("test", cfg.test)):
        split_root = ensure_dir(out / split_dir_name(split, cfg.duration))
        settings_path = split_root / ".build" / "settings.json"
        if settings_path.exists():
            built = read_json(settings_path)
            if (version := built.get("render_version", 1)) != RENDER_VERSION:  # before it was recorded: 1
                raise SpecalignError(
                    f"{settings_path}: this split was drawn by an older renderer (version {version}, now "
                    f"{RENDER_VERSION}); delete it or use another --out"
                )
            if built != _jsonable(cfg.settings()):
                raise SpecalignError(
                    f"{settings_path}: this split was built with other settings; use another --out or delete it"
                )
        else:
            write_json(settings_path, _jsonable(cfg.settings()))
        tasks += plan_sequences(split, n, cfg.clips_per_sequence)
    todo = [t for t in tasks if not _marker_path(cfg, t).exists()]
    done_clips = sum(t.n_clips for t in tasks) - sum(t.n_clips for t in todo)
    bar = tqdm(total=sum(t.n_clips for t in tasks), initial=done_clips, unit="clip", desc="world build",
               disable=not progress, smoothing=0.05)  # fmt: skip
    if cfg.workers > 1 and len(todo) > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(cfg.workers) as pool:
            for marker in pool.imap_unordered(_worker, [(t, cfg) for t in todo]):
                bar.update(len(marker["entries"]))
    else:
        for t in todo:
            bar.update(len(build_sequence(t, cfg)["entries"]))
    bar.close()

    summary = {"out": str(out), "duration": cfg.duration, "seed": cfg.seed, "splits": {}}
    texts = set()
    for split in ("train", "test"):
        split_name = split_dir_name(split, cfg.duration)
        entries = []
        for t in (t for t in tasks if t.split == split):
            marker = read_json(_marker_path(cfg, t))
            entries += marker["entries"]
            if split == "train":
                texts.update(marker["texts"])
        write_json(out / split_name / INDEX_NAME, entries)
        summary["splits"][split] = {"dir": split_name, "clips": len(entries),
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
    manifest = read_json(out / "world.json") if (out / "world.json").exists() else {}
    manifest["sensor_size"] = [cfg.width, cfg.height]
    manifest.setdefault("builds", {})[cfg.duration] = {"settings": _jsonable(cfg.settings()), "summary": summary}
    write_json(out / "world.json", manifest)
    return summary


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
        raise SpecalignError(f"{path}: cannot read a tokenizer ({str(e).splitlines()[0][:120]})") from None
    unk = tok.token_to_id("<unk>")
    for text in sorted(texts):
        if unk is not None and unk in tok.encode(text).ids:
            raise SpecalignError(f"{path}: this tokenizer cannot encode the answer {text[:60]!r}... without <unk>")
    return tok


def _marker_path(cfg: WorldConfig, t: SequenceTask) -> Path:
    return Path(cfg.out) / split_dir_name(t.split, cfg.duration) / ".build" / f"{t.name}.json"


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj))
