"""The reference study's derived dataset layout (`my_egpt_dsec_{train,seq}_<duration>/`).

    <split>/EventGPT_Instruction_Subset.json      index: one entry per clip
    <split>/event_npy/<seq>/<clip>.npy            event dict (see event_npy.py)
    <split>/video/<seq>/<clip>/<frame>.png        every RGB frame whose timestamp lies in the window (the
                                                  entry's `video_frames` names them, in time order)
    <split>/mp4/<seq>/<clip>.mp4                  the same frames at 20 fps (H.264)
    <split>/event_image/<seq>/<clip>_{0..4}.png   5 event images, equal event count
    <split>/event_image_1f/<seq>/<clip>_0.png     1 event image of the whole clip

Windows have duration D and 50% overlap, starting at the first image timestamp; a window is kept while
start + D <= last image timestamp; clip names count planned windows, so a skipped (empty) window leaves a
gap in the numbering, as in the reference builder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specalign.data.event_image import event_images
from specalign.data.event_npy import save_event_npy
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import atomic_path, write_bytes, write_png

INDEX_NAME = "EventGPT_Instruction_Subset.json"
DURATIONS_US = {"500ms": 500_000, "1s": 1_000_000, "2s": 2_000_000, "4s": 4_000_000}
VIDEO_FPS = 20


def parse_duration(text: str) -> int:
    """'500ms' | '1s' | '2s' | '4s' -> microseconds."""
    if text not in DURATIONS_US:
        raise SpecalignError(f"--duration: unknown duration {text!r}: choose one of {', '.join(DURATIONS_US)}")
    return DURATIONS_US[text]


def split_dir_name(split: str, duration: str) -> str:
    """The reference's folder names: train -> my_egpt_dsec_train_1s, test -> my_egpt_dsec_seq_1s."""
    kind = {"train": "train", "test": "seq"}[split]
    return f"my_egpt_dsec_{kind}_{duration}"


@dataclass
class EncodedFrame:
    """A frame with its PNG bytes, so a frame shared by two overlapping clips is encoded once."""

    image: np.ndarray  # uint8 [H, W, 3]
    png: bytes


@dataclass
class Window:
    index: int  # planned-window number; the clip is named f"{index:06d}"
    time_start: int  # microseconds, inclusive
    time_end: int  # microseconds, exclusive
    image_indices: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.index:06d}"


def plan_windows(image_ts, duration_us: int) -> list[Window]:
    """Windows of `duration_us` with 50% overlap from the first image timestamp."""
    ts = np.asarray(image_ts, dtype=np.int64)
    if len(ts) == 0:
        return []
    step = duration_us // 2
    first, last = int(ts[0]), int(ts[-1])
    windows = []
    start = first
    while start + duration_us <= last:
        end = start + duration_us
        idx = np.nonzero((ts >= start) & (ts < end))[0].tolist()
        windows.append(Window(len(windows), start, end, idx))
        start += step
    return windows


def clip_record(events: dict, window: Window, duration_us: int) -> dict:
    """The event dict the reference stores per clip (field order kept for identical bytes)."""
    return {
        "p": np.asarray(events["p"], dtype=np.uint8),
        "t": np.asarray(events["t"], dtype=np.int64),
        "x": np.asarray(events["x"], dtype=np.uint16),
        "y": np.asarray(events["y"], dtype=np.uint16),
        "time_start": int(window.time_start),
        "time_end": int(window.time_end),
        "duration_ms": duration_us / 1000.0,
        "image_timestamp": int(window.time_end),
        "image_idx": int(window.image_indices[0]) if window.image_indices else int(window.index),
        "image_indices_in_clip": [int(i) for i in window.image_indices],
        "num_events": int(len(events["t"])),
    }


def write_mp4(path: str | Path, frames: list[np.ndarray], fps: int = VIDEO_FPS) -> bool:
    """H.264 / yuv420p at `fps`, atomically. Returns False when PyAV or the encoder is unavailable."""
    try:
        import av
    except ImportError:
        return False
    h, w = frames[0].shape[:2]
    with atomic_path(path) as tmp:
        try:
            container = av.open(str(tmp), mode="w", format="mp4")
            stream = container.add_stream("libx264", rate=fps)
        except Exception:
            return False
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        # one thread and no macroblock-tree rate control: x264's mbtree code gives different bytes from run to run
        # for heights that are not a multiple of 16 (e.g. 1080), and a resumed build must write the same files
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[: stream.height, : stream.width]), "rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
    return True


def _read_png(path: Path, decode: bool) -> np.ndarray | None:
    """uint8 [H, W, 3] when decode, else None after checking the file is a whole PNG; one-line error if not."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise fail(path, f"not a PNG image but {im.format}")
            if decode:
                return np.asarray(im.convert("RGB"))
            im.verify()  # every chunk's checksum, up to IEND: finds a truncated or damaged file without decoding
            return None
    except OSError as e:
        raise fail(path, f"unreadable image ({one_line(e)})") from None
    except SyntaxError as e:  # PIL's "broken PNG file"
        raise fail(path, f"damaged PNG ({one_line(e)})") from None


def write_clip(
    root: str | Path,
    split_name: str,
    seq: str,
    window: Window,
    duration_us: int,
    events: dict,
    frames: list,
    frame_names: list[str],
    sensor_size: tuple[int, int],
    conversations: list[dict],
    mp4: bool = True,
) -> dict:
    """Write one clip of the derived layout and return its index entry.

    events: dict x, y, t (absolute us), p for the window. frames: the window's RGB frames, each a uint8
    [H, W, 3] array, an EncodedFrame, or the path of a PNG to copy; frame_names: their file names. sensor_size is
    (width, height) of the event camera; it sizes the event images.
    """
    root = Path(root)
    clip = window.name
    if len(events["t"]) == 0:
        raise fail(f"{seq}/{clip}", "empty window: no events")
    save_event_npy(root / "event_npy" / seq / f"{clip}.npy", clip_record(events, window, duration_us))

    arrays = []
    for img, name in zip(frames, frame_names, strict=True):
        dst = root / "video" / seq / clip / name
        if isinstance(img, EncodedFrame):
            write_bytes(dst, img.png)
            arrays.append(img.image)
        elif isinstance(img, np.ndarray):
            write_png(dst, img)
            arrays.append(img)
        else:  # a raw PNG: checked whole (a truncated one would be copied as is), then copied byte for byte
            image = _read_png(img, decode=mp4)
            with atomic_path(dst) as tmp:
                shutil.copyfile(img, tmp)
            if image is not None:
                arrays.append(image)
    mp4_rel = f"{seq}/{clip}.mp4"
    if not (mp4 and arrays and write_mp4(root / "mp4" / mp4_rel, arrays)):
        mp4_rel = None

    five = event_images(events, 5, sensor_size, path=root / "event_npy" / seq / f"{clip}.npy")
    for i, img in enumerate(five):
        write_png(root / "event_image" / seq / f"{clip}_{i}.png", img)
    write_png(root / "event_image_1f" / seq / f"{clip}_0.png", event_images(events, 1, sensor_size)[0])

    return {
        "id": f"{seq}/{clip}",
        "split": split_name,
        "event_data": f"{seq}/{clip}.npy",
        "video_data": f"{seq}/{clip}",
        "video_frames": list(frame_names),  # what readers take from video_data (never a stray or temp file)
        "mp4_data": mp4_rel,
        "event_image": [f"{seq}/{clip}_{i}.png" for i in range(5)],
        "event_image_1f": [f"{seq}/{clip}_0.png"],
        "conversations": conversations,
    }
