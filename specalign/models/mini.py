"""The bundled mini-world models: a tiny Video-LLaVA target and a tiny EventGPT draft, trained from scratch.

`specalign models train-mini --role target|draft --world DIR` trains one of them on a minidsec world:
target: 8 RGB frames + question -> the target-voice answer; draft: the 1f event image + question -> the
draft-voice answer. Both use the world's shared tokenizer. The result is a checkpoint directory in the real
model's own layout (so it loads through the same code path as a user's 7B checkpoint) plus `manifest.json`
with the command, data seed, commit and held-out metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specalign.data import open_dataset
from specalign.errors import SpecalignError
from specalign.evaluate.quality import QualityReport
from specalign.fsutil import write_json
from specalign.options import option
from specalign.runs import require_positive

# SPECALIGN_ASSETS points at another assets folder (the GPU machine trains into /tmp)
ASSETS = Path(os.environ.get("SPECALIGN_ASSETS") or Path(__file__).resolve().parents[2] / "assets")
BUNDLED = {"mini-target": ASSETS / "mini-target", "mini-draft": ASSETS / "mini-draft"}


@dataclass
class MiniSizes:
    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    lm_hidden: int = 256
    lm_layers: int = 4
    lm_heads: int = 4
    lm_intermediate: int = 768


SIZES = {
    "target": MiniSizes(),
    # the draft is cheaper: one event image instead of 8 frames, and a smaller LM
    "draft": MiniSizes(vision_hidden=128, vision_layers=3, lm_hidden=192, lm_layers=3, lm_intermediate=512),
}


ROLES = ("target", "draft")


@dataclass
class TrainConfig:
    """`specalign models train-mini`: one mini model trained on a minidsec world (the CLI options are these fields)."""

    role: str = option(help="which mini model: the target (Video-LLaVA) or the draft (EventGPT)", choices=ROLES)
    world: str = option(help="a minidsec world folder (from `world build`)")
    out: str | None = option(None, help="checkpoint folder (default: the bundled assets/mini-ROLE); resumes if "
                             "it holds an unfinished run with the same settings")  # fmt: skip
    overwrite: bool = option(False, help="start over: clear the output folder if it holds a run with other settings")
    duration: str = option("1s", help="clip duration of the world's splits: 500ms | 1s | 2s | 4s")
    steps: int = option(2000, help="optimizer steps")
    clips_per_batch: int = option(32, help="clips per step (each with --questions-per-clip questions)")
    questions_per_clip: int = option(4, help="questions per clip and step")
    lr: float = option(1e-3, help="peak learning rate (linear warm-up, then cosine decay to lr/20)")
    warmup: int = option(100, help="warm-up steps")
    weight_decay: float = option(0.01, help="AdamW weight decay")
    seed: int = option(0, help="seed of the initial weights and of the batch order")
    eval_clips: int = option(200, help="held-out clips scored after training (x50 questions)")
    checkpoint_every: int = option(250, help="steps between resumable checkpoints")
    max_train_clips: int | None = option(None, help="train on at most this many of the world's clips (default all)")
    time_budget: float | None = option(None, help="seconds of training at most: the schedule is fitted to it, "
                                       "and training stops (and saves) when it is spent")  # fmt: skip
    init: str | None = option(None, help="continue from this checkpoint (a bundled name such as mini-target, or a "
                              "folder) instead of from scratch")  # fmt: skip
    add_vision_layers: int = option(0, help="with --init, target only: insert this many vision layers that start "
                                    "as the identity")  # fmt: skip
    add_lm_layers: int = option(0, help="with --init, target only: append this many LM layers that start as the "
                                "identity")  # fmt: skip
    image_size: int | None = option(None, help="from scratch: the vision tower's input side (default 112; e.g. 224 "
                                    "with --patch-size 28 on a world built with --frame-scale 2: finer pixels, as "
                                    "many visual tokens)")  # fmt: skip
    patch_size: int | None = option(None, help="from scratch: the vision tower's patch side (default 14)")
    fresh_scenes: bool = option(False, help="target only: keep replacing training clips with never-seen drives "
                                "rendered on the fly")  # fmt: skip
    fresh_buffer: int = option(8192, help="clips held for training at once with --fresh-scenes")
    fresh_workers: int | None = option(None, help="processes rendering fresh scenes (default: all cores but two)")
    device: str | None = option(None, help="cuda | cpu (default: cuda when available)")
    sizes: MiniSizes | None = option(None, cli=False)  # the architecture from scratch (default SIZES[role])

    def __post_init__(self):
        if self.role not in ROLES:
            raise SpecalignError(f"--role: unknown role {self.role!r}: choose target or draft")
        if self.out is None:
            self.out = str(BUNDLED[f"mini-{self.role}"])
        for name in ("steps", "clips_per_batch", "questions_per_clip", "eval_clips", "checkpoint_every",
                     "max_train_clips", "fresh_buffer", "fresh_workers"):  # fmt: skip
            require_positive(name, getattr(self, name))
        for name in ("warmup", "seed", "add_vision_layers", "add_lm_layers"):
            require_positive(name, getattr(self, name), 0)
        require_positive("weight_decay", self.weight_decay, 0)
        for name in ("lr", "time_budget"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise SpecalignError(f"--{name.replace('_', '-')}: must be positive, got {value!r}")
        from specalign.world.qa import QUESTIONS

        if self.questions_per_clip > len(QUESTIONS):
            raise SpecalignError(f"--questions-per-clip: a clip has {len(QUESTIONS)} questions, "
                                 f"got {self.questions_per_clip}")  # fmt: skip
        if self.add_vision_layers or self.add_lm_layers:
            if not self.init:
                raise SpecalignError("--add-vision-layers/--add-lm-layers deepen a model continued with --init")
            if self.role != "target":
                raise SpecalignError("--add-vision-layers/--add-lm-layers: only the target can be deepened")
        if self.fresh_scenes and self.role != "target":
            raise SpecalignError("--fresh-scenes: only the target's clips can be rendered on the fly (the draft "
                                 "needs the event camera: build a bigger world for it)")  # fmt: skip
        if self.image_size is not None or self.patch_size is not None:
            if self.init:
                raise SpecalignError("--image-size/--patch-size: a model continued with --init keeps its own sizes")
            require_positive("image_size", self.image_size)
            require_positive("patch_size", self.patch_size)
        if self.sizes is None:
            self.sizes = SIZES[self.role]
        self.sizes = replace(self.sizes, image_size=self.image_size or self.sizes.image_size,
                             patch_size=self.patch_size or self.sizes.patch_size)  # fmt: skip
        if self.sizes.image_size % self.sizes.patch_size:
            raise SpecalignError(f"--image-size {self.sizes.image_size} is not a multiple of --patch-size "
                                 f"{self.sizes.patch_size}")  # fmt: skip
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            torch.device(self.device)
        except RuntimeError:
            raise SpecalignError(f"--device: unknown device {self.device!r}: choose cuda or cpu") from None


def voice(role: str) -> str:
    return {"target": "target", "draft": "draft"}[role]


def new_model(role: str, tokenizer_file: Path, sizes: MiniSizes, seed: int = 0):
    """A freshly initialised VLM of the role's architecture (a models.base.VLM backend object)."""
    vision = dict(image_size=sizes.image_size, patch_size=sizes.patch_size, hidden_size=sizes.vision_hidden,
                  intermediate_size=4 * sizes.vision_hidden, num_hidden_layers=sizes.vision_layers,
                  num_attention_heads=sizes.vision_heads)  # fmt: skip
    if role == "target":
        from specalign.models.video_llava import build_video_llava, video_llava_from_parts

        text = dict(hidden_size=sizes.lm_hidden, intermediate_size=sizes.lm_intermediate,
                    num_hidden_layers=sizes.lm_layers, num_attention_heads=sizes.lm_heads)  # fmt: skip
        model, processor = build_video_llava(tokenizer_file, vision=vision, text=text, seed=seed)
        vlm = video_llava_from_parts(model, processor, name="mini-target")
    elif role == "draft":
        from specalign.models.eventgpt import build_eventgpt

        vlm = build_eventgpt(tokenizer_file, sizes, seed=seed)
    else:
        raise SpecalignError(f"--role: unknown role {role!r}: choose target or draft")
    squash_frames(vlm)
    return vlm


def squash_frames(vlm) -> None:
    """Resize whole frames into the vision tower's square.

    CLIP's shortest-edge resize + centre crop cuts 12.5 % off each side of a 4:3 frame, where the parked cars and
    buildings are. The setting is saved with the checkpoint, so the model sees at inference what it trained on.
    """
    proc = vlm.image_processor
    crop = proc.crop_size  # the vision tower's input side: a dict or a SizeDict
    side = crop["height"] if isinstance(crop, dict) else crop.height
    proc.do_center_crop = False
    proc.size = {"height": side, "width": side}


def deepen_target(vlm, vision_layers: int = 0, lm_layers: int = 0) -> None:
    """Make a Video-LLaVA model deeper, in place, without changing what it computes: training then continues
    with more capacity instead of starting over.

    Each new layer is a copy of its neighbour with the output projections of its attention and MLP zeroed
    (out_proj/fc2 in CLIP, o_proj/down_proj in Llama), so its residual branches add nothing until trained.
    New Llama layers go after the last; new vision layers before the tower's last one, because Video-LLaVA reads
    the second-to-last layer's output (vision_feature_layer -2) and so never uses the last."""
    import copy

    model, cfg = vlm.model, vlm.model.config
    if vision_layers < 0 or lm_layers < 0:
        raise SpecalignError(f"deepen: layers can only be added, not {vision_layers} vision / {lm_layers} LM")
    if vision_layers:
        if cfg.vision_feature_layer not in (-1, -2):
            raise SpecalignError(f"deepen: vision_feature_layer {cfg.vision_feature_layer} (only -1 or -2 handled)")
        for tower in (model.model.video_tower, model.model.image_tower):  # one vision config builds both towers
            layers = getattr(tower, "vision_model", tower).encoder.layers  # transformers 5 flattened it
            at = len(layers) + 1 + cfg.vision_feature_layer  # after the layer whose output is read
            for _ in range(vision_layers):
                new = copy.deepcopy(layers[max(at - 1, 0)])
                for linear in (new.self_attn.out_proj, new.mlp.fc2):
                    torch.nn.init.zeros_(linear.weight)
                    torch.nn.init.zeros_(linear.bias)
                layers.insert(at, new)
        cfg.vision_config.num_hidden_layers += vision_layers
    if lm_layers:
        layers = model.model.language_model.layers
        for _ in range(lm_layers):
            new = copy.deepcopy(layers[-1])
            for linear in (new.self_attn.o_proj, new.mlp.down_proj):
                torch.nn.init.zeros_(linear.weight)
                if linear.bias is not None:
                    torch.nn.init.zeros_(linear.bias)
            layers.append(new)
        for i, layer in enumerate(layers):  # the KV cache finds a layer's slot by its index
            layer.self_attn.layer_idx = i
        cfg.text_config.num_hidden_layers += lm_layers
        if getattr(cfg.text_config, "layer_types", None):  # one entry per layer where the config has them
            cfg.text_config.layer_types = [*cfg.text_config.layer_types, *[cfg.text_config.layer_types[-1]] * lm_layers]


def _init_from(cfg: TrainConfig, tokenizer_file: Path):
    """The checkpoint to continue from, in fp32; its tokenizer must be the world's (answers are token ids)."""
    from tokenizers import Tokenizer

    from specalign.models import bundled_path, load_model

    vlm = load_model(cfg.init, dtype="fp32")
    expected = {"target": "video-llava", "draft": "eventgpt"}[cfg.role]
    if vlm.kind != expected:
        raise SpecalignError(f"--init {cfg.init}: a {vlm.kind} checkpoint cannot continue as the {cfg.role}")
    if cfg.add_vision_layers or cfg.add_lm_layers:
        deepen_target(vlm, cfg.add_vision_layers, cfg.add_lm_layers)
    # the checkpoint keeps the view it learnt on (the bundled models: centre crops): a trained model switched to
    # squashed whole frames must relearn every object's look, for the 0.3 % of colour facts the crop hides
    if vlm.tokenizer.get_vocab() != Tokenizer.from_file(str(tokenizer_file)).get_vocab():
        source = (bundled_path(cfg.init) or Path(cfg.init)) / "tokenizer.json"
        raise SpecalignError(f"--init {cfg.init}: its tokenizer differs from {tokenizer_file}; build the world "
                             f"with `specalign world build --tokenizer {source}`")  # fmt: skip
    return vlm


def _pairs(dataset, role: str, max_clips: int | None):
    """Per clip: its ground-truth QA list [(question, answer in the role's voice)]."""
    clips = []
    n = len(dataset) if max_clips is None else min(max_clips, len(dataset))
    for i in range(n):
        truth = dataset[i].ground_truth()
        if truth is None:
            raise SpecalignError(f"{dataset.root}: sample {i} has no ground truth (train-mini needs a minidsec world)")
        clips.append([(qa["question"], qa[voice(role)]) for qa in truth["qa"]])
    return clips


def _encode_batch(vlm, prompts_answers):
    """[(prompt ids [T], answer ids [A])] -> right-padded input_ids, attention_mask, labels (prompt = -100)."""
    seqs = [torch.cat([p, a]) for p, a in prompts_answers]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), vlm.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, ((p, a), s) in enumerate(zip(prompts_answers, seqs, strict=True)):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = a
    return ids, mask, labels


class _VisualInputs(torch.utils.data.Dataset):
    def __init__(self, vlm, dataset, n: int):
        self.vlm, self.dataset, self.n = vlm, dataset, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.vlm.visual_inputs(self.dataset[i])


def _visual_inputs(vlm, dataset, n: int, progress: bool) -> list[dict]:
    """The first n samples' visual inputs, decoded and preprocessed by worker processes (PNG decoding and the
    image processor are the slow part of a large world's start-up)."""
    workers = min(16, max(0, (os.cpu_count() or 1) - 1)) if n > 64 else 0
    loader = torch.utils.data.DataLoader(_VisualInputs(vlm, dataset, n), batch_size=None, num_workers=workers)
    return list(tqdm(loader, total=n, disable=not progress, desc="visual inputs", unit="clip"))


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
    Why: trained on a fixed world, the mini target learns to recognise its few thousand drives rather than to
    read colours and objects off the frames (held-out colour 52 % vs 81 % on its training drives).
    """

    def __init__(self, vlm, world_cfg, seed: int, stream: int):
        self.vlm, self.world_cfg, self.seed, self.stream = vlm, world_cfg, seed, stream

    def __iter__(self):
        from specalign.world.build import clip_frames
        from specalign.world.qa import all_answers
        from specalign.world.scene import sample_scene

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
                raise SpecalignError(f"fresh scenes: a worker failed: {str(item).splitlines()[0][:200]}") from item
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


def encode_answer(vlm, text: str, eos: int) -> torch.Tensor:
    """An answer as the training labels see it: long [A], its own tokens then EOS."""
    return torch.tensor(vlm.tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [eos], dtype=torch.long)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except Exception:
        return "unknown"


def train_mini(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train one mini model; returns its manifest. Resumes from out/train_state.pt when present."""
    from specalign.data.layout import split_dir_name
    from specalign.world.build import load_world_config

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    world = Path(cfg.world)
    # fresh scenes use the world's camera settings: a bad world.json fails here, before any heavy work
    fresh_world = load_world_config(world, cfg.duration) if cfg.fresh_scenes else None
    tokenizer_file = world / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SpecalignError(f"{world}: not a minidsec world (tokenizer.json is missing)")
    train = open_dataset(world / split_dir_name("train", cfg.duration))
    test = open_dataset(world / split_dir_name("test", cfg.duration))
    device = torch.device(cfg.device)
    if cfg.init:
        vlm = _init_from(cfg, tokenizer_file)
    else:
        vlm = new_model(cfg.role, tokenizer_file, cfg.sizes, cfg.seed)
    vlm.model.to(device)

    qa = _pairs(train, cfg.role, cfg.max_train_clips)
    n_clips = len(qa)
    print(f"[train-mini {cfg.role}] {n_clips} clips x {len(qa[0])} questions; preparing visual inputs", flush=True)
    visual = [{k: t.to(device) for k, t in v.items()} for v in _visual_inputs(vlm, train, n_clips, progress)]
    eos = vlm.eos_token_id
    prompt_ids = {q: vlm.expand_prompt(vlm.prompt_text(q), visual[0]) for q, _ in qa[0]}
    answer_ids = {}

    def answer_tokens(answer):  # a world clip's answer text, or a fresh clip's ids (tokenized by its worker)
        if isinstance(answer, torch.Tensor):
            return answer
        if answer not in answer_ids:
            answer_ids[answer] = encode_answer(vlm, answer, eos)
        return answer_ids[answer]

    params = sum(p.numel() for p in vlm.model.parameters())
    opt = torch.optim.AdamW(vlm.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step):
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    start, history = 0, []
    if state_path.exists():  # resume
        st = torch.load(state_path, map_location=device, weights_only=True)
        vlm.model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, history = int(st["step"]), [tuple(h) for h in st["history"].tolist()]
        rng = np.random.default_rng([cfg.seed, start])
        print(f"[train-mini {cfg.role}] resuming at step {start}", flush=True)

    feed, fresh, ring, capacity = None, 0, 0, max(cfg.fresh_buffer, n_clips)
    if fresh_world is not None:
        workers = cfg.fresh_workers or max(1, (os.cpu_count() or 2) - 2)
        feed = FreshFeed(FreshScenes(vlm, fresh_world, cfg.seed, start), workers)
        print(f"[train-mini {cfg.role}] fresh scenes from {workers} worker processes, buffer {capacity} clips",
              flush=True)  # fmt: skip

    vlm.model.train()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), disable=not progress, desc=f"train {cfg.role}", initial=start, total=cfg.steps)
    for step in bar:
        if feed is not None:  # new clips take the place of the oldest once the buffer is full
            # the first step waits for a fresh clip (a broken worker fails here), later ones take what is ready
            wait = max(1 if step == start else 0, cfg.clips_per_batch - len(qa))
            for v, answers in feed.take(at_least=wait):
                v = {k: torch.from_numpy(t).to(device) for k, t in v.items()}
                answers = [(q, torch.from_numpy(a)) for q, a in answers]
                if len(qa) < capacity:
                    visual.append(v)
                    qa.append(answers)
                else:
                    visual[ring], qa[ring], ring = v, answers, (ring + 1) % len(qa)
                fresh += 1
        clips = rng.choice(len(qa), size=min(cfg.clips_per_batch, len(qa)), replace=False)
        items, vis = [], []
        for c in clips:
            for k in rng.choice(len(qa[c]), size=cfg.questions_per_clip, replace=False):
                q, a = qa[c][k]
                items.append((prompt_ids[q], answer_tokens(a)))
                vis.append(visual[c])
        ids, mask, labels = _encode_batch(vlm, items)
        batch_visual = {k: torch.cat([v[k] for v in vis]) for k in vis[0]}
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with autocast:
            loss = vlm.model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                             **vlm.visual_kwargs(batch_visual)).loss  # fmt: skip
        if not torch.isfinite(loss):
            raise SpecalignError(f"{out}: loss became {loss.item()} at step {step}; last checkpoint kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.model.parameters(), 1.0)
        opt.step()
        history.append((step, loss.item()))
        if cfg.time_budget and step == start + 10:
            t10 = time.time()  # the first steps pay for CUDA start-up: time the rate after them
        if cfg.time_budget and step == start + 60:
            # fit the schedule to the budget, so the cosine decay ends when the time does (resumes keep it)
            rate = (time.time() - t10) / 50
            fit = step + 1 + int((cfg.time_budget - (time.time() - t0)) / rate * 0.97)
            if fit < cfg.steps:
                print(f"[train-mini {cfg.role}] {fit} steps fit the time budget (of {cfg.steps})", flush=True)
                cfg.steps = fit
                bar.total = fit
        if cfg.time_budget and time.time() - t0 > cfg.time_budget:  # hard cap: stop and save what we have
            print(f"[train-mini {cfg.role}] time budget reached at step {step + 1} of {cfg.steps}", flush=True)
            cfg.steps = step + 1
        if step + 1 >= cfg.steps:
            break
        bar.set_postfix(loss=f"{history[-1][1]:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": vlm.model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                        "history": torch.tensor(history)}, tmp)  # fmt: skip
            tmp.replace(state_path)
    train_seconds = time.time() - t0
    if feed is not None:
        feed.close()

    # Bundle in bf16 (small), then measure the bundled weights, not the fp32 master copy.
    vlm.model.eval()
    vlm.model.to(torch.bfloat16)
    vlm.save(out)
    vlm.model.to(torch.float32)
    metrics = evaluate_quality(vlm, test, cfg.role, cfg.eval_clips, progress=progress)
    world_meta = json.loads((world / "world.json").read_text()) if (world / "world.json").exists() else {}
    manifest = {
        "name": f"mini-{cfg.role}",
        "role": cfg.role,
        "command": " ".join(["specalign", *sys.argv[1:]]) if sys.argv and "specalign" in sys.argv[0] else None,
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("out",)},
        "world": {
            "path": str(world),
            "seed": world_meta.get("builds", {}).get(cfg.duration, {}).get("settings", {}).get("seed"),
        },
        "commit": git_commit(),
        "parameters": params,
        "fresh_clips": fresh,
        "train_seconds": round(train_seconds, 1),
        "final_loss": round(float(np.mean([h[1] for h in history[-50:]])), 4) if history else None,
        "held_out": metrics,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
    }
    write_json(out / "manifest.json", manifest)
    state_path.unlink(missing_ok=True)
    return manifest


@torch.inference_mode()
def evaluate_quality(vlm, dataset, role: str, max_clips: int, batch_size: int = 100, progress: bool = True) -> dict:
    """Greedy answers to all 50 questions on `max_clips` held-out clips, scored against the ground truth."""
    from specalign.models.base import Prompt

    report = QualityReport()
    # clips of one drive share a scene: spread the picks over the split so they cover many drives
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(max_clips, len(dataset))).round().astype(int))
    jobs = []  # (prompt, truth, group); one visual encode input per clip, shared by its 50 questions
    for i in picks.tolist():
        s = dataset[i]
        truth = s.ground_truth()
        vis = vlm.visual_inputs(s)
        for qa in truth["qa"]:
            text = vlm.prompt_text(qa["question"])
            jobs.append(
                (Prompt(vlm.expand_prompt(text, vis), vis, text), qa[voice(role)], truth["scene"]["time_of_day"])
            )
    for b in tqdm(range(0, len(jobs), batch_size), disable=not progress, desc=f"eval {role}", unit="batch"):
        chunk = jobs[b : b + batch_size]
        outs = vlm.generate([p for p, _, _ in chunk], max_new_tokens=72)
        for (_, truth, group), ids in zip(chunk, outs, strict=True):
            report.add(vlm.decode(ids), truth, group)
    return report.summary()
