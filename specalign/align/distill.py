"""`specalign distill`: teach a draft VLM the target's voice with LoRA (sequence-level distillation).

The labels are the target's greedy answers (token ids) from an extraction (`specalign extract`) of a split; the
draft reads its own prompt (its template, the sample's event image) and learns each answer by cross-entropy (prompt
masked) through LoRA adapters (peft) on its language model's decoder projections only (q/k/v/o, gate/up/down of
every Llama layer): the CLIP tower (whose layers also have a q_proj), projector, embeddings and LM head stay frozen.

out/: adapter/ (peft's adapter_config.json + adapter_model.safetensors); with --merge (default) the merged draft in
its own checkpoint layout (`--draft OUT` for speculate, extract, answer); manifest.json; train_state.pt while
unfinished (LoRA weights, optimizer, step: the same command resumes it). Held-out, before and after: teacher-forced
next-token accuracy on the target's answers and first-token accuracy (the draft's greedy first answer token is the
target's: what hiding the target's prefill needs), argmax over the ids the draft may propose (`shared_ids`), on
--eval-pairs (an extraction of the test split by the same target) or on the last 5 % of the train samples.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specalign.align.train import _lr_lambda, require_finite
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import read_json, write_json
from specalign.models.train_mini import command_line, encode_batch, finished_extraction, load_visual_inputs
from specalign.options import option
from specalign.runs import OVERWRITE_HELP, check_settings, dataset_identity, exclusive, require_positive

# the Llama decoder's projections; peft full-matches module names, so the CLIP tower's
# `model.visual_tower.visual_tower.vision_model.encoder.layers.N.self_attn.q_proj` is never adapted
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
HOLDOUT = 0.05  # of the train samples, held out when no --eval-pairs are given
COSMETIC = ("out", "overwrite", "device", "checkpoint_every")  # a resume may change these


@dataclass
class DistillConfig:
    draft: str = option(help="an EventGPT checkpoint (a bundled name such as mini-draft, or a folder)")
    pairs: str = option(help="an extraction (`specalign extract`) of --dataset: the target's answers to learn")
    dataset: str = option(help="the split folder the extraction was made of (the draft's event images)")
    out: str = option(help="output folder (a re-run with the same settings resumes it)")
    eval_pairs: str | None = option(None, help="an extraction of the test split by the same target, for the "
                                    "held-out numbers (default: the last 5 %% of the train samples)")  # fmt: skip
    lora_rank: int = option(16, help="LoRA rank r")
    lora_alpha: float = option(32.0, help="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, help="dropout on the LoRA input")
    steps: int = option(1000, help="optimizer steps")
    batch_size: int = option(8, help="answers per step (and per held-out batch)")
    lr: float = option(2e-4, help="peak AdamW learning rate (linear warm-up, then cosine decay)")
    warmup: int = option(30, help="warm-up steps")
    seed: int = option(0, help="LoRA initial weights, dropout and batch order")
    max_samples: int | None = option(None, help="train on the first N samples of the extraction (default all)")
    eval_samples: int | None = option(None, help="score at most this many held-out samples (default all)")
    checkpoint_every: int = option(100, help="steps between resumable checkpoints")
    merge: bool = option(True, help="also save the draft with the adapter merged in, in its own checkpoint layout")
    device: str | None = option(None, help="cuda | cpu (default: cuda when available)")
    dtype: str | None = option(None, help="the frozen weights' precision: bf16 | fp16 | fp32 (default: bf16 on GPU, "
                               "fp32 on CPU); LoRA weights are fp32")  # fmt: skip
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        for name in ("lora_rank", "steps", "batch_size", "max_samples", "eval_samples", "checkpoint_every"):
            require_positive(name, getattr(self, name))
        for name in ("warmup", "seed"):
            require_positive(name, getattr(self, name), 0)
        for name in ("lora_alpha", "lr", "lora_dropout"):
            require_finite(name, getattr(self, name), positive=name != "lora_dropout")
        if self.lora_dropout >= 1:
            raise SpecalignError(f"--lora-dropout: must be below 1, got {self.lora_dropout}")
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _answers(path: Path, shared: int) -> dict[int, list[tuple[str, torch.Tensor]]]:
    """{sample: [(question, the target's answer ids long [A])]} of an extraction; an id the draft cannot emit (not
    below `shared`) is refused."""
    from specalign.align.tokens import read_pairs

    pairs, out = read_pairs(path), {}
    for i, (s, query, ids) in enumerate(zip(pairs.sample_idx, pairs.query, pairs.target, strict=True)):
        bad = next((t for t in ids if t >= shared), None)
        if bad is not None:
            raise fail(path, f"pair {i}: answer id {bad} is not one the draft shares with the target (ids below "
                             f"{shared}): the draft cannot emit it")  # fmt: skip
        if ids:
            out.setdefault(int(s), []).append((query, torch.tensor(ids, dtype=torch.long)))
    if not out:
        raise fail(path, "holds no answers")
    return out


def _batch(vlm, rows: list, visual: dict) -> dict:
    """The model's keyword arguments for rows [(sample, prompt ids [T], answer ids [A])], answers as labels."""
    ids, mask, labels = encode_batch(vlm, [(p, a) for _, p, a in rows])
    vis = {k: torch.cat([visual[s][k] for s, _, _ in rows]) for k in visual[rows[0][0]]}
    args = dict(input_ids=ids, attention_mask=mask, labels=labels, **vlm.visual_kwargs(vis))
    return {k: v.to(vlm.device) for k, v in args.items()}


def answer_metrics(vlm, rows: list, visual: dict, shared: int, batch_size: int) -> dict:
    """Teacher-forced scores of the draft on rows [(sample, prompt ids [T], answer ids [A])]: mean CE per answer
    token, next-token accuracy and first-token accuracy (argmax over the `shared` ids the draft may propose)."""
    loss, hits, tokens, first = 0.0, 0, 0, 0
    with torch.no_grad():
        for b in range(0, len(rows), batch_size):
            args = _batch(vlm, rows[b : b + batch_size], visual)
            labels = args.pop("labels")
            logits, gold = vlm.model(**args).logits[:, :-1].float(), labels[:, 1:]  # logits at i: token i + 1
            m = gold != -100
            loss += torch.nn.functional.cross_entropy(logits[m], gold[m], reduction="sum").item()
            right = (logits[..., :shared].argmax(-1) == gold) & m
            hits, tokens = hits + int(right.sum()), tokens + int(m.sum())
            first += int(right.gather(1, m.int().argmax(1, keepdim=True)).sum())  # at each row's first answer token
    return {"loss": round(loss / tokens, 4), "token_accuracy": round(hits / tokens, 4),
            "first_token_accuracy": round(first / len(rows), 4), "answers": len(rows), "tokens": tokens}  # fmt: skip


def _visuals(vlm, split, samples: list[int], progress: bool) -> dict[int, dict]:
    """{sample: its visual inputs (CPU tensors, batch dim 1)} of these samples of the split only."""
    samples = sorted(set(samples))
    return dict(zip(samples, load_visual_inputs(vlm, [split[i] for i in samples], len(samples), progress), strict=True))


def _prompt_rows(vlm, answers: dict, visual: dict) -> list:
    """[(sample, the draft's prompt ids [T], answer ids [A])] in sample order (a question's prompt ids are the same
    for every sample: the visual slots are placeholders)."""
    prompt = functools.cache(lambda q: vlm.expand_prompt(vlm.prompt_text(q), next(iter(visual.values()))))
    return [(s, prompt(q), a) for s in sorted(answers) for q, a in answers[s]]


def distill(cfg: DistillConfig, progress: bool = True) -> dict:
    """LoRA-distil the draft on the target's answers; returns the manifest. Every input is checked before the
    model loads; a folder holding a run with other settings is refused (unless cfg.overwrite); a finished run is
    returned as it is."""
    from specalign.align.tokens import pairs_identity
    from specalign.data import open_dataset
    from specalign.decode.sources import shared_ids
    from specalign.models import check_model, inspect_model, load_model, weights_stamp

    dataset = open_dataset(cfg.dataset)
    info = finished_extraction(cfg.pairs, cfg.dataset)
    target = info.get("settings", {}).get("target")
    eval_info = finished_extraction(cfg.eval_pairs) if cfg.eval_pairs else None
    if eval_info and eval_info["dataset"] == info["dataset"]:
        raise fail(cfg.eval_pairs, "extracted from the train split itself: held-out answers come from another split")
    if eval_info and (theirs := eval_info.get("settings", {}).get("target")) != target:
        raise fail(cfg.eval_pairs, f"answers of the target {theirs!r}, the train pairs of {target!r}: not comparable")
    draft = check_model(cfg.draft, "--draft")
    if draft["backend"] != "eventgpt":
        raise SpecalignError(f"--draft {cfg.draft}: a {draft['backend']} checkpoint; distill trains an EventGPT draft")
    try:
        theirs = inspect_model(target)
    except SpecalignError as e:
        raise fail(cfg.pairs, f"its target cannot be checked ({e})") from None
    shared = shared_ids(draft["tokenizer"], theirs["tokenizer"], draft["vocab_size"], theirs["vocab_size"],
                        cfg.draft, target)  # fmt: skip
    answers = _answers(Path(cfg.pairs), shared)
    samples = sorted(answers)
    if eval_info:
        held_out, held = _answers(Path(cfg.eval_pairs), shared), cfg.eval_pairs
        held_split = open_dataset(eval_info["dataset"]["path"])
    else:
        k = max(1, math.ceil(HOLDOUT * len(samples)))
        if k >= len(samples):
            raise fail(cfg.pairs, f"{len(samples)} sample(s): too few to hold out {HOLDOUT:.0%}; pass --eval-pairs")
        held_out, held, held_split = {s: answers.pop(s) for s in samples[-k:]}, "last 5 % of the train samples", dataset
    train = {s: answers[s] for s in sorted(answers)[: cfg.max_samples]}
    held_out = {s: held_out[s] for s in sorted(held_out)[: cfg.eval_samples]}
    settings = {k: v for k, v in asdict(cfg).items() if k not in COSMETIC}
    settings.update(dataset=dataset_identity(cfg.dataset), pairs_data=pairs_identity(cfg.pairs),
                    eval_data=pairs_identity(cfg.eval_pairs) if cfg.eval_pairs else None,
                    draft_weights=weights_stamp(cfg.draft))  # fmt: skip
    with exclusive(cfg.out) as out:
        new = check_settings(out, settings, cfg.overwrite)
        if not new and (out / "manifest.json").is_file() and not (out / "train_state.pt").exists():
            print(f"[distill] {out} already holds this run, finished")
            return read_json(out / "manifest.json")
        vlm = load_model(cfg.draft, device=cfg.device, dtype=cfg.dtype)
        same = held_split is dataset
        visual = _visuals(vlm, dataset, [*train, *(held_out if same else ())], progress)
        held_visual = visual if same else _visuals(vlm, held_split, list(held_out), progress)
        rows, eval_rows = _prompt_rows(vlm, train, visual), _prompt_rows(vlm, held_out, held_visual)
        manifest = _train(cfg, vlm, rows, eval_rows, visual, held_visual, shared, out, progress)
        manifest.update(target=target, held_out_source=held, shared_ids=shared)
        write_json(out / "manifest.json", manifest)
        (out / "train_state.pt").unlink(missing_ok=True)
        return manifest


def _train(cfg, vlm, rows, eval_rows, visual, held_visual, shared, out: Path, progress: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=LORA_TARGETS)  # fmt: skip
    with warnings.catch_warnings():  # transformers' deprecation notice for a call inside peft: not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(vlm.model, lora_config)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lora.values(), lr=cfg.lr, weight_decay=0.0)
    schedule = _lr_lambda(cfg.warmup, cfg.steps)
    state_path, start, history, spent = out / "train_state.pt", 0, [], 0.0
    if state_path.exists():  # resume
        try:
            st = torch.load(state_path, map_location=vlm.device, weights_only=True)
            for n, p in lora.items():
                p.data.copy_(st["lora"][n])
            opt.load_state_dict(st["optimizer"])
            start, history, spent = int(st["step"]), st["history"].tolist(), float(st["seconds"])
        except Exception as e:  # truncated, or not this model's
            raise fail(state_path, f"unreadable training state ({one_line(e)}); delete it to start over") from None
        print(f"[distill] resuming at step {start}", flush=True)
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), disable=not progress, desc="distill", initial=start, total=cfg.steps)
    for step in bar:
        # batch order and dropout depend on (seed, step) only: a resumed run trains exactly as an unbroken one
        pick = np.random.default_rng([cfg.seed, step]).choice(len(rows), min(cfg.batch_size, len(rows)), False)
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * schedule(step)
        loss = model(**_batch(vlm, [rows[i] for i in pick], visual)).loss
        if not torch.isfinite(loss):
            raise SpecalignError(f"{out}: loss became {loss.item()} at step {step}; last checkpoint kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.values(), 1.0)
        opt.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"lora": {n: p.detach() for n, p in lora.items()}, "optimizer": opt.state_dict(),
                        "step": step + 1, "history": torch.tensor(history), "seconds": spent + time.time() - t0},
                       tmp)  # fmt: skip
            tmp.replace(state_path)
    seconds = spent + time.time() - t0
    model.eval()
    after = answer_metrics(vlm, eval_rows, held_visual, shared, cfg.batch_size)
    with model.disable_adapter():  # the frozen base: the draft before distillation
        before = answer_metrics(vlm, eval_rows, held_visual, shared, cfg.batch_size)
    model.save_pretrained(str(out / "adapter"))
    trained, total = model.get_nb_trainable_parameters()
    if cfg.merge:
        vlm.model = model.merge_and_unload()
        vlm.save(out)
    return {"command": command_line(), "settings": {k: v for k, v in asdict(cfg).items() if k != "overwrite"},
            "parameters": {"trained": trained, "total": total}, "train_seconds": round(seconds, 1),
            "final_loss": round(float(np.mean(history[-50:])), 4) if history else None,
            "held_out": {"before": before, "after": after}, "adapter": str(out / "adapter"),
            "merged": str(out) if cfg.merge else None,
            "device": torch.cuda.get_device_name(vlm.device) if vlm.device.type == "cuda" else "cpu"}  # fmt: skip


def result_lines(m: dict) -> list[str]:
    """The console summary of a distillation (its manifest)."""
    b, a, p = m["held_out"]["before"], m["held_out"]["after"], m["parameters"]
    merged = f"; merged draft: --draft {m['merged']}" if m["merged"] else ""
    return [f"distilled: {p['trained']:,} of {p['total']:,} parameters trained (LoRA), {m['train_seconds']} s, "
            f"final loss {m['final_loss']}",
            f"  held-out ({a['answers']} answers, {m['held_out_source']}): next-token accuracy "
            f"{b['token_accuracy']:.3f} -> {a['token_accuracy']:.3f}, first-token accuracy "
            f"{b['first_token_accuracy']:.3f} -> {a['first_token_accuracy']:.3f}",
            f"  adapter: {m['adapter']}{merged}"]  # fmt: skip
