"""EventGPT's event images: events painted on a white canvas, split into N images of equal event count."""

from __future__ import annotations

import numpy as np

from specalign.errors import fail

BLUE = (0, 0, 255)  # polarity 0
RED = (255, 0, 0)  # polarity 1


def event_image(x, y, p, size: tuple[int, int] | None = None) -> np.ndarray:
    """Paint events on white: p=0 blue, p=1 red, later events overwrite earlier ones.

    size is (width, height); None means (max x + 1, max y + 1) as in EventGPT's own code.
    Returns uint8 [H, W, 3].
    """
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p)
    if size is None:
        if len(x) == 0:
            raise ValueError("cannot size an event image from zero events")
        size = (int(x.max()) + 1, int(y.max()) + 1)
    w, h = size
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    # numpy fancy assignment keeps the last write for repeated indices, i.e. later events win.
    colours = np.where((p == 1)[:, None], np.array(RED, np.uint8), np.array(BLUE, np.uint8))
    img[y, x] = colours
    return img


def split_by_count(n_events: int, n: int) -> list[tuple[int, int]]:
    """[start, end) slices of N parts of equal event count; the last part takes the remainder."""
    per = n_events // n
    return [(i * per, (i + 1) * per if i < n - 1 else n_events) for i in range(n)]


def event_images(events: dict, n: int = 5, size: tuple[int, int] | None = None, path="events") -> list[np.ndarray]:
    """N event images of a clip (EventGPT uses 5; `event_image_1f` is n=1). Each uint8 [H, W, 3]."""
    total = len(events["t"])
    if total == 0:
        raise fail(path, "event stream has no events: cannot make event images")
    if size is not None and (int(np.max(events["x"])) >= size[0] or int(np.max(events["y"])) >= size[1]):
        raise fail(path, f"events outside the {size[0]}x{size[1]} sensor")
    return [
        event_image(events["x"][a:b], events["y"][a:b], events["p"][a:b], size) for a, b in split_by_count(total, n)
    ]
