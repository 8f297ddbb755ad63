"""`specalign models train-mini`: train the mini target or draft (models/registry.py) from scratch on a world.

target: 8 RGB frames + question -> the target-voice answer; draft: the 1f event image + question -> the
draft-voice answer. Both use the world's shared tokenizer. The result is a checkpoint directory in the real
model's own layout (so it loads through the same code path as a user's 7B checkpoint) plus `manifest.json`
with the command, data seed, commit and held-out metrics.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specalign.data import open_dataset
from specalign.errors import SpecalignError, fail, one_line
from specalign.evaluate.quality import evaluate_quality
from specalign.fsutil import read_json, write_json
from specalign.models.registry import BUNDLED, ROLES, SIZES, MiniSizes, new_model
from specalign.models.surgery import deepen_target
from specalign.options import option
from specalign.runs import OVERWRITE_HELP, check_settings, dataset_identity, exclusive, file_identity, require_positive
from specalign.world.fresh import FreshFeed, FreshScenes


@dataclass
class TrainConfig:
    """`specalign models train-mini`: one mini model trained on a minidsec world (the CLI options are these fields)."""

    role: str = option(help="which mini model: the target (Video-LLaVA) or the draft (EventGPT)", choices=ROLES)
    world: str = option(help="a minidsec world folder (from `world build`)")
    out: str | None = option(None, help="checkpoint folder (default: the bundled assets/mini-ROLE); resumes if "
                             "it holds an unfinished run with the same settings")  # fmt: skip
    overwrite: bool = option(False, help=OVERWRITE_HELP)
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
    teacher_pairs: str | None = option(None, help="draft only: learn the target's own greedy answers (the vl_tokens "
                                       "of this extraction of the same train split) instead of the draft-voice "
                                       "references: sequence-level distillation, a draft in the target's "
                                       "voice")  # fmt: skip
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
        if self.teacher_pairs is not None and self.role != "draft":
            raise SpecalignError("--teacher-pairs: only the draft learns the target's answers")
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
        clips.append([(qa["question"], qa[role]) for qa in truth["qa"]])
    return clips


def finished_extraction(path: str | Path, split: str | Path | None = None) -> dict:
    """The manifest of a finished `specalign extract` folder made of `split` (None: of the split its manifest
    names, unchanged since); one-line errors for an unfinished extraction or another (or changed) split."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise fail(path, "not a finished extraction (no manifest.json): run (or finish) `specalign extract`")
    info = read_json(path / "manifest.json")
    own = (info.get("dataset") or {}).get("path", "?")
    try:
        same = info.get("dataset") == dataset_identity(own if split is None else split)
    except SpecalignError:
        same = False
    if not same:
        raise fail(path, f"extracted from another split than {split} (or the split changed since)" if split else
                         f"its split {own} is gone or changed since the extraction")  # fmt: skip
    return info


def teacher_answers(path: str | Path, split: Path, max_clips: int | None) -> list[list[tuple[str, torch.Tensor]]]:
    """Per clip of the train split: [(question, the target's greedy answer ids)] from an extraction of that split
    (its pairs.jsonl vl_tokens), in question order. Refuses an extraction of another split, or one that misses a
    clip."""
    from specalign.align.tokens import read_pairs

    path = Path(path)
    info = finished_extraction(path, split)
    from tokenizers import Tokenizer

    from specalign.models import inspect_model

    target = info.get("settings", {}).get("target")
    theirs = inspect_model(target)["tokenizer"].get_vocab() if target else None
    if theirs != Tokenizer.from_file(str(split.parent / "tokenizer.json")).get_vocab():
        raise fail(path, f"its target {target} does not use this world's tokenizer: its answer ids would mean "
                         "other words to the draft")  # fmt: skip
    pairs = read_pairs(path)
    by_clip: dict[int, list] = {}
    for s, q, query, ids in zip(pairs.sample_idx, pairs.question_idx, pairs.query, pairs.target, strict=True):
        by_clip.setdefault(int(s), []).append((int(q), query, torch.tensor(ids, dtype=torch.long)))
    n = len(by_clip) if max_clips is None else min(max_clips, len(by_clip))
    missing = next((i for i in range(n) if i not in by_clip), None)
    if missing is not None:
        raise fail(path, f"has no answers for train clip {missing}")
    return [[(query, ids) for _, query, ids in sorted(by_clip[i], key=lambda x: x[0])] for i in range(n)]


def encode_batch(vlm, prompts_answers):
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


def load_visual_inputs(vlm, dataset, n: int, progress: bool) -> list[dict]:
    """The first n samples' visual inputs, decoded and preprocessed by worker processes (PNG decoding and the
    image processor are the slow part of a large world's start-up)."""
    workers = min(16, max(0, (os.cpu_count() or 1) - 1)) if n > 64 else 0
    loader = torch.utils.data.DataLoader(_VisualInputs(vlm, dataset, n), batch_size=None, num_workers=workers)
    return list(tqdm(loader, total=n, disable=not progress, desc="visual inputs", unit="clip"))


def encode_answer(vlm, text: str, eos: int) -> torch.Tensor:
    """An answer as the training labels see it: long [A], its own tokens then EOS."""
    return torch.tensor(vlm.tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [eos], dtype=torch.long)


def command_line() -> str | None:
    """The `specalign ...` command this process runs (None under pytest or the Python API)."""
    return " ".join(["specalign", *sys.argv[1:]]) if sys.argv and "specalign" in sys.argv[0] else None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except Exception:
        return "unknown"


# what a resumed run may change: where it writes and runs, and how long it may take
NOT_SETTINGS = ("out", "overwrite", "device", "time_budget")


def train_mini(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train one mini model; returns its manifest. Resumes from out/train_state.pt when the run there has the
    same settings (hyper-parameters, world splits, tokenizer, --init weights); refuses other settings unless
    cfg.overwrite. A finished run with the same settings is returned as it is."""
    from specalign.data.layout import split_dir_name
    from specalign.models import weights_stamp
    from specalign.world.build import load_world_config

    world = Path(cfg.world)
    if not world.is_dir():
        raise fail(world, "no such world folder (build one with `specalign world build`)")
    # fresh scenes use the world's camera settings: a bad world.json fails here, before any heavy work
    fresh_world = load_world_config(world, cfg.duration) if cfg.fresh_scenes else None
    tokenizer_file = world / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SpecalignError(f"{world}: not a minidsec world (tokenizer.json is missing)")
    splits = {name: world / split_dir_name(name, cfg.duration) for name in ("train", "test")}
    train, test = open_dataset(splits["train"]), open_dataset(splits["test"])
    for name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise fail(splits[name], f"the {name} split is empty: nothing to {name} on")
    settings = {
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS},
        "train_split": dataset_identity(splits["train"]),
        "test_split": dataset_identity(splits["test"]),
        "tokenizer": file_identity(tokenizer_file),
        "init_weights": weights_stamp(cfg.init) if cfg.init else None,
        "fresh_world": asdict(fresh_world) if fresh_world else None,
    }
    teacher = None
    if cfg.teacher_pairs:
        teacher = teacher_answers(cfg.teacher_pairs, splits["train"], cfg.max_train_clips)
        settings["teacher_pairs"] = file_identity(Path(cfg.teacher_pairs) / "pairs.jsonl")
    vlm = _init_from(cfg, tokenizer_file) if cfg.init else new_model(cfg.role, tokenizer_file, cfg.sizes, cfg.seed)
    with exclusive(cfg.out) as out:
        new = check_settings(out, settings, cfg.overwrite)
        if not new and (out / "manifest.json").is_file() and not (out / "train_state.pt").exists():
            print(f"[train-mini {cfg.role}] {out} already holds this run, finished")
            return read_json(out / "manifest.json")
        return _train(cfg, vlm, world, train, test, fresh_world, out, progress, teacher)


def _train(cfg: TrainConfig, vlm, world: Path, train, test, fresh_world, out: Path, progress: bool,
           teacher: list | None = None) -> dict:  # fmt: skip
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    vlm.model.to(device)

    qa = teacher or _pairs(train, cfg.role, cfg.max_train_clips)
    n_clips = len(qa)
    print(f"[train-mini {cfg.role}] {n_clips} clips x {len(qa[0])} questions; preparing visual inputs", flush=True)
    visual = [{k: t.to(device) for k, t in v.items()} for v in load_visual_inputs(vlm, train, n_clips, progress)]
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

    state_path = out / "train_state.pt"
    start, history = 0, []
    if state_path.exists():  # resume
        try:
            st = torch.load(state_path, map_location=device, weights_only=True)
            vlm.model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            start, history = int(st["step"]), [tuple(h) for h in st["history"].tolist()]
        except Exception as e:  # truncated, or not this model's
            raise fail(state_path, f"unreadable training state ({one_line(e)}); delete it to start over") from None
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
            for k in rng.choice(len(qa[c]), size=min(cfg.questions_per_clip, len(qa[c])), replace=False):
                q, a = qa[c][k]
                items.append((prompt_ids[q], answer_tokens(a)))
                vis.append(visual[c])
        ids, mask, labels = encode_batch(vlm, items)
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
    voice = "target" if cfg.teacher_pairs else cfg.role  # a distilled draft speaks the target's voice
    metrics = evaluate_quality(vlm, test, voice, cfg.eval_clips, progress=progress)
    world_meta = json.loads((world / "world.json").read_text()) if (world / "world.json").exists() else {}
    manifest = {
        "name": f"mini-{cfg.role}",
        "role": cfg.role,
        "command": command_line(),
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite")},
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
