"""Fresh scenes: never-seen drives rendered on the fly while a model trains (`train-mini --fresh-scenes`).

Trained on a fixed world, the mini target learns to recognise its few thousand drives rather than to read colours
and objects off the frames (held-out colour 52 % vs 81 % on its training drives). FreshScenes renders new drives in
DataLoader worker processes and FreshFeed hands them to the training loop between steps.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import numpy as np
import torch

from specalign.errors import SpecalignError, one_line
from specalign.world.build import clip_frames
from specalign.world.qa import all_answers
from specalign.world.scene import sample_scene

FRESH_SPLIT_ID = 2  # fresh scenes draw from their own seed stream: never a built train (0) or test (1) drive
# Which clip of its drive a fresh scene shows, drawn from the first FRESH_WINDOWS (a default world has 8 a drive).
# Always the first one taught a shortcut: the centre-line dashes start every drive at the same phase, so their
# place in the first frames gave away the ego speed, and held-out second clips got it wrong (day: 32 of 52).
FRESH_WINDOWS = 8


class _RenderedClip:
    """Just enough of a dataset sample for `vlm.visual_inputs`: frames already rendered."""

    def __init__(self, frames: np.ndarray, name: str):
        self._frames, self.video_dir = frames, name

    def frames(self, n: int = 8) -> np.ndarray:
        return self._frames


class FreshScenes(torch.utils.data.IterableDataset):
    """Endless never-seen drives for the target, made in DataLoader workers while the GPU trains.

    Each item is one clip of a new drive (one of its first FRESH_WINDOWS): its frames rendered with the world's
    camera settings (world.build.clip_frames: no event camera, ~10x cheaper than building a drive) and
    preprocessed, with the 50 answers in the target's voice already tokenized. Yields ({"pixel_values_videos": float32
    [1, 8, 3, S, S]}, [(question, answer ids int64 [A])]) as numpy arrays.
    """

    def __init__(self, vlm, world_cfg, seed: int, stream: int):
        self.vlm, self.world_cfg, self.seed, self.stream = vlm, world_cfg, seed, stream

    def __iter__(self):
        from specalign.models.train_mini import encode_answer  # the training labels' tokenization

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        eos = self.vlm.eos_token_id
        k = 0
        while True:
            rng = np.random.default_rng([self.seed, FRESH_SPLIT_ID, self.stream, worker, k])
            scene = sample_scene(rng)
            window = int(rng.integers(FRESH_WINDOWS))
            frames = clip_frames(scene, self.world_cfg, rng, self.vlm.num_frames, window)
            visual = self.vlm.visual_inputs(_RenderedClip(frames, f"fresh scene {worker}/{k}"))
            answers = [(qa["question"], encode_answer(self.vlm, qa["target"], eos)) for qa in all_answers(scene)]
            # numpy, not tensors: DataLoader passes each tensor as a shared-memory file descriptor, and 51 of
            # them per clip run out the process's descriptors ("received 0 items of ancdata")
            yield {name: t.numpy() for name, t in visual.items()}, [(q, a.numpy()) for q, a in answers]
            k += 1


class FreshFeed:
    """FreshScenes from `workers` processes into a queue, drained by the training loop between steps."""

    def __init__(self, dataset: FreshScenes, workers: int):
        self.queue: queue.Queue = queue.Queue(maxsize=2048)
        self.stop = threading.Event()
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                  prefetch_factor=8, worker_init_fn=_one_thread,
                                                  collate_fn=_as_is)  # keep numpy: see FreshScenes  # fmt: skip
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for item in self.loader:
                self.queue.put(item)
                if self.stop.is_set():
                    return
        except Exception as e:  # handed to the training loop, which raises it
            self.queue.put(e)

    def take(self, at_least: int = 0) -> list:
        """Every clip ready now; waits until there are `at_least`."""
        items = [self.queue.get() for _ in range(at_least)]
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if isinstance(item, Exception):
                raise SpecalignError(f"fresh scenes: a worker failed: {one_line(item)}") from item
        return items

    def close(self):
        """Stops the workers: the thread sees the flag after its next put (emptying the queue unblocks it)."""
        self.stop.set()
        deadline = time.time() + 30
        while self.thread.is_alive() and time.time() < deadline:
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.1)


def _one_thread(_worker_id):
    torch.set_num_threads(1)


def _as_is(item):
    return item
