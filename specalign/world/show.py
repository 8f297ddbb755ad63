"""A contact sheet of one clip: what the target sees (RGB), what the draft sees (events), and what each says.

    row 1   the 8 RGB frames the target model gets
    row 2   the 5 event images (+ the 1f image) the draft model gets
    row 3   the scene graph, and one question answered by "target (sees RGB)" and "draft (sees events)"

Real DSEC clips have no scene graph; their conversations are shown instead.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from specalign.data.dataset import Sample, open_dataset, pick_frames
from specalign.data.layout import VIDEO_FPS
from specalign.errors import SpecalignError, fail
from specalign.fsutil import atomic_path

FIGSIZE = (16, 8.4)  # inches; at DPI this is 1600 x 840 px
DPI = 100
N_FRAMES = 8
TARGET_COLOUR = "#1b7837"
DRAFT_COLOUR = "#2c5aa0"
ANSWER_WRAP = 62  # characters per line in an answer column
SCENE_WRAP = 72
MAX_SCENE_LINES = 30  # about what fits the panel at 8 pt


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _item_line(item) -> str:
    """One scene object on one line: its words first ("red car oncoming left"), then its numbers."""
    if not isinstance(item, dict):
        return _fmt(item)
    words = [str(v) for v in item.values() if isinstance(v, str)]
    numbers = [f"{k}={_fmt(v)}" for k, v in item.items() if not isinstance(v, str) and v is not None]
    return " ".join(words) + ("  " + " ".join(numbers) if numbers else "")


def scene_lines(scene: dict) -> list[str]:
    """The scene graph as compact lines: scalars on one line, one line per vehicle / pedestrian / row."""
    if not isinstance(scene, dict):
        return [_fmt(scene)]
    scalars = [f"{k}: {_fmt(v)}" for k, v in scene.items() if not isinstance(v, list | dict) and v is not None]
    lines = textwrap.wrap(" · ".join(scalars), SCENE_WRAP) if scalars else []
    for key, value in scene.items():
        if isinstance(value, list):
            lines.append(f"{key} ({len(value)}):" if value else f"{key}: none")
            lines += [f"  - {_item_line(v)}" for v in value]
        elif isinstance(value, dict):
            lines.append(f"{key}: {_item_line(value)}")
    if len(lines) > MAX_SCENE_LINES:
        lines = lines[: MAX_SCENE_LINES - 1] + [f"... (+{len(lines) - MAX_SCENE_LINES + 1} more lines)"]
    return lines


def _find_qa(qa: list, question: str) -> dict | None:
    key = " ".join(question.split()).casefold()
    for item in qa:
        if isinstance(item, dict) and " ".join(str(item.get("question", "")).split()).casefold() == key:
            return item
    return None


def _wrap(text: str, width: int = ANSWER_WRAP) -> str:
    return "\n".join(textwrap.fill(p, width) if p else "" for p in str(text).splitlines()) or "(empty)"


def _message(ax, text: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, _wrap(text, 28), ha="center", va="center", fontsize=8, color="#a00", transform=ax.transAxes)


def _image(ax, img: np.ndarray, title: str) -> None:
    ax.imshow(img, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _rgb_row(fig, cells, sample: Sample) -> None:
    try:
        paths = sample.frame_paths()
        frames = sample.frames(N_FRAMES)
    except SpecalignError as e:
        for k, cell in enumerate(cells):
            _message(fig.add_subplot(cell), str(e) if k == 0 else "")
        return
    for k, (cell, idx) in enumerate(zip(cells, pick_frames(len(paths), N_FRAMES), strict=True)):
        ax = fig.add_subplot(cell)
        _image(ax, frames[k], f"frame {idx}/{len(paths) - 1}  t≈{idx / VIDEO_FPS:.2f}s\n{paths[idx].name}")
        if k == 0:
            ax.set_ylabel("target: RGB", fontsize=10, color=TARGET_COLOUR, fontweight="bold")


def _event_row(fig, cells, sample: Sample) -> None:
    for n, slots, titles in (
        (5, cells[:5], [f"events {k + 1}/5 (equal count)" for k in range(5)]),
        (1, cells[6:7], ["1f: the whole clip"]),
    ):
        try:
            images = sample.event_images(n)
        except SpecalignError as e:
            _message(fig.add_subplot(slots[0]), str(e))
            continue
        for k, (cell, img) in enumerate(zip(slots, images, strict=True)):
            ax = fig.add_subplot(cell)
            _image(ax, img, titles[k])
            if n == 5 and k == 0:
                ax.set_ylabel("draft: events", fontsize=10, color=DRAFT_COLOUR, fontweight="bold")
    info = fig.add_subplot(cells[7])
    info.axis("off")
    try:
        ev = sample.events()
        lines = [f"{len(ev['t']):,} events"]
        if "time_start" in ev and "time_end" in ev:
            lines.append(f"window {(int(ev['time_end']) - int(ev['time_start'])) / 1e6:g} s")
        lines.append("blue: p=0 (darker)\nred: p=1 (brighter)")
    except SpecalignError as e:
        lines = [str(e)]
    info.text(0.02, 0.5, _wrap("\n".join(lines), 30), fontsize=8, va="center", transform=info.transAxes)


def _text(ax, head: str, body: str, colour: str = "black", family: str = "sans-serif", size: float = 9) -> None:
    ax.axis("off")
    ax.text(0, 1, head, fontsize=11, fontweight="bold", color=colour, va="top", transform=ax.transAxes)
    ax.text(0, 0.93, body, fontsize=size, family=family, va="top", transform=ax.transAxes, linespacing=1.35)


def contact_sheet(dataset_dir: str | Path, sample: int, out_png: str | Path, question: str | None = None) -> Path:
    """Draw sample `sample` of the split at `dataset_dir` and write a 1600x1000 PNG to out_png (atomically).

    question: which ground-truth question to show answered by both models; default the sample's own question.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ds = open_dataset(dataset_dir)
    s = ds[sample]
    question = question if question is not None else s.question
    gt = s.ground_truth()

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display needed
    fig.suptitle(f"{ds.split_name} · sample {int(sample)} of {len(ds)} · {s.id}", fontsize=13, fontweight="bold")
    outer = fig.add_gridspec(
        3, 1, height_ratios=[1, 1, 2.2], hspace=0.16, left=0.025, right=0.99, top=0.915, bottom=0.01
    )
    _rgb_row(fig, list(outer[0].subgridspec(1, 8, wspace=0.06)), s)
    _event_row(fig, list(outer[1].subgridspec(1, 8, wspace=0.06)), s)
    left, mid, right = outer[2].subgridspec(1, 3, wspace=0.04, width_ratios=[1.15, 1, 1])

    if gt is None:
        _text(fig.add_subplot(left), "scene graph", "none: no ground truth for this clip\n(real DSEC data)")
        turns = [f"{t.get('from', '?')}: {str(t.get('value', '')).strip() or '(empty)'}" for t in s.conversations]
        body = "\n\n".join(_wrap(t, 2 * ANSWER_WRAP) for t in turns) or "(no conversations)"
        _text(fig.add_subplot(mid.get_gridspec()[0, 1:]), "conversations", body)
    else:
        scene = gt.get("scene")
        body = "\n".join(scene_lines(scene)) if scene is not None else "(no scene in the ground truth)"
        _text(fig.add_subplot(left), "scene graph", body, family="monospace", size=8)
        qa = _find_qa(gt.get("qa") or [], question) if question else None
        head = f"Q: {question}" if question else "Q: (none)"
        if qa is not None and qa.get("category"):
            head += f"   [{qa['category']}]"
        for cell, who, key, colour in (
            (mid, "target (sees RGB)", "target", TARGET_COLOUR),
            (right, "draft (sees events)", "draft", DRAFT_COLOUR),
        ):
            answer = qa.get(key, "(missing)") if qa is not None else "(no ground-truth answer to this question)"
            _text(fig.add_subplot(cell), who, _wrap(head) + "\n\nA: " + _wrap(answer), colour=colour, size=10)

    out_png = Path(out_png)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    except OSError as e:
        raise fail(out_png, f"cannot write the contact sheet ({e.strerror or e})") from None
    return out_png
