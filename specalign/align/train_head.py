"""Train a draft head (`eagle`, `eagle+events`) or the cascade's `feature-adapter` on a features run.

Data: a features folder (`specalign.align.features`): per (sample, question) the target's greedy answer, its
text ids after the visual block, the target's final normed state at each id (and optionally three layers), the
draft VLM's state over the same answer and its event tokens. Self-distillation: the labels are the target's own
tokens, never reference answers.

Recipe (EAGLE-1/3, sized for small heads; every number is an option):
- loss: cross-entropy on the target's next token through the target's FROZEN LM head, over every row whose
  next-next token exists (prompt text rows too), + `feature_loss` (1.0) x smooth-L1 between the head's output
  at row i and the target's feature at row i + 1 (EAGLE-1's regression; EAGLE-3 drops it, 0 allowed; here it
  keeps the head's own outputs usable as features and lengthens chains even with training-time test);
- training-time test (EAGLE-3): `ttt_steps` unrolled steps, step j feeding the head's own step j-1 outputs back
  as features (`DraftHead.unroll`); step j's loss weighs 0.8^j (EAGLE-3's weights);
- uniform noise U(-noise, noise) on the true input features; AdamW betas (0.9, 0.95), grad clip 0.5, linear
  warm-up then cosine decay.

Metrics on the eval set, answer rows only (the rows a drafter is asked about: the token after the first answer
token on): teacher-forced top-1/top-5, and the offline chain acceptance: from every answer row, the head drafts
`depth` tokens greedily on its own features (exactly what a chain drafter computes while its guesses are right)
and the accepted length is the number of leading drafts equal to the target's tokens; tau = 1 + mean accepted (the
target's bonus token included), reported with the acceptance rate at each depth. Cosine similarity to the next
target feature is reported for reference only, never as acceptance. The best epoch is the one with the highest
offline tau (ties: top-1).

Writes `<out>/<kind>_YYYYMMDD_HHMMSS/`: best_model/ (save_head), results.json, RESULTS.md, training_curves.png,
last_state.pt (each epoch; `resume=<task dir>` continues it), run_settings.json (a resume with other data or
settings is refused on one line); `<out>/latest` links the newest finished task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from specalign.align.heads import (
    KINDS,
    LAYOUTS,
    FeatureAdapter,
    HeadConfig,
    attach_parts,
    build_head,
    check_layout,
    count_parameters,
    save_head,
    target_text_config,
)
from specalign.align.train import STATE_NAME, _autocast, _lr_lambda, link_latest, require_finite, task_dir
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import atomic_path, save_png, write_bytes, write_json
from specalign.options import option
from specalign.runs import OVERWRITE_HELP, require_positive, shared_run_folder

BETAS = (0.9, 0.95)  # EAGLE's AdamW betas
STEP_DECAY = 0.8  # EAGLE-3: the loss of training-time-test step j weighs 0.8^j
IGNORE = -100
# what train and eval features must agree on (meta.json keys)
SAME_MODELS = ("target", "draft", "target_hidden_size", "target_vocab_size", "draft_hidden_size",
               "tokenizer_fingerprint", "layer_indices")  # fmt: skip
# fields that change where things go or speed, never the trained weights
COSMETIC = ("features", "eval_features", "out", "device", "resume", "overwrite")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class HeadTrainConfig:
    features: str = option(help="a features folder of the train split (target features, draft states, events)")
    kind: str = option("eagle", choices=KINDS, help="eagle: the target's features; eagle+events: + the "
                       "draft's event tokens; feature-adapter: the draft VLM's states -> the target's feature "
                       "space")  # fmt: skip
    out: str = option("heads", help="task folders go here as <kind>_<timestamp>, with a `latest` link")
    eval_features: str | None = option(None, help="a features folder of the test split for the reported "
                                       "metrics (default: hold out the last --holdout of the train samples, by "
                                       "sample)")  # fmt: skip
    holdout: float = option(0.1, help="fraction of the train samples (all their questions) held out for "
                            "evaluation when --eval-features is not given")  # fmt: skip
    epochs: int = option(10, help="passes over the training sequences (the mini-target's head levels off by 8-10 "
                         "on 1,024 answers)")  # fmt: skip
    batch_size: int = option(32, help="sequences per step")
    lr: float = option(1e-3, help="AdamW learning rate (EAGLE's 3e-5 is for 0.2 B-parameter heads on 68k "
                       "dialogues; a 1 M-parameter head on 1k answers learns fastest at 1e-3: 3e-3 is no "
                       "better)")  # fmt: skip
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(20, help="linear warm-up steps before the cosine decay")
    grad_clip: float = option(0.5, help="gradient norm clip (EAGLE's 0.5)")
    noise: float = option(0.1, help="uniform noise U(-x, x) on the true input features (EAGLE)")
    feature_loss: float = option(1.0, help="weight of the smooth-L1 loss on the next target feature, beside "
                                 "cross-entropy at 1 (EAGLE-1: 1.0 with 0.1 x CE; EAGLE-3: 0; with training-time "
                                 "test it still lengthens chains here: offline tau 5.29 vs 5.07)")  # fmt: skip
    ttt_steps: int = option(3, help="training-time test: steps unrolled on the head's own outputs (1: plain "
                            "teacher forcing, whose chains collapse after one draft: offline tau 2.5 vs 5.1; 5 is "
                            "no better than 3 and slower)")  # fmt: skip
    depth: int = option(6, help="chain depth of the offline acceptance metric")
    fused: bool = option(False, help="read the target's fused low/mid/high-layer features instead of its last "
                         "layer (EAGLE-3; the features run must hold them)")  # fmt: skip
    layout: str = option("specalign", choices=LAYOUTS, help="specalign: norms before and after the layer; eagle-1: "
                         "EAGLE-1's head exactly (no norms, fc without bias), which `export-head` writes for vLLM and "
                         "SGLang (plain eagle heads only)")  # fmt: skip
    intermediate_size: int | None = option(None, help="the head's MLP width (default: the target layer's; the "
                                           "feature adapter's: 2 x the target's hidden size)")  # fmt: skip
    seed: int = option(0, help="initial weights, noise and sequence order")
    device: str | None = option(None, help="cuda | cpu (default: cuda when available)")
    bf16: bool = option(True, help="bf16 autocast (CUDA only)")
    resume: str | None = option(None, help="a task folder to continue (same data and settings)")
    overwrite: bool = option(False, help="with --resume: " + OVERWRITE_HELP)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SpecalignError(f"--kind: unknown head kind {self.kind!r}: choose {', '.join(KINDS)}")
        for name in ("epochs", "batch_size", "ttt_steps", "depth", "intermediate_size"):
            require_positive(name, getattr(self, name))
        require_positive("warmup_steps", self.warmup_steps, 0)
        for name in ("lr", "weight_decay", "grad_clip", "noise", "feature_loss", "holdout"):
            require_finite(name, getattr(self, name), positive=name in ("lr", "grad_clip"))
        if self.holdout >= 1:
            raise SpecalignError(f"--holdout: must be below 1, got {self.holdout}")
        if self.fused and self.kind == "feature-adapter":
            raise SpecalignError("--fused: the feature adapter reads the draft's states, not the target's layers")
        check_layout(self.layout, self.kind, self.fused)


# ---------------------------------------------------------------- data


def open_features(path: str | Path):
    """A FeatureStore (features.py) with a one-line error for a folder that is not one."""
    from specalign.align.features import FeatureStore

    return FeatureStore(path)


@dataclass
class Rows:
    """One (sample, question) prepared for a head, length T, on the CPU.

    eagle / eagle+events (T = m - 1): inputs [T, F] = the target's features at ids 0..m-2, tokens [T] = ids
    1..m-1, labels [T] = ids 2..m-1 then IGNORE, next_feature [T, D] = the target's features at ids 1..m-1.
    feature-adapter (T = n answer tokens): inputs [T, Dd] = the draft's states, tokens None, labels = the answer,
    next_feature = the target's features at rows k-1 .. k-2+n (what the target predicted each answer token from).
    answer bool [T]: rows a drafter is asked about (their label is an answer token after the first)."""

    key: tuple[int, int]
    inputs: torch.Tensor
    tokens: torch.Tensor | None
    labels: torch.Tensor
    answer: torch.Tensor
    next_feature: torch.Tensor
    events: torch.Tensor | None


def make_rows(rec, kind: str, fused: bool) -> Rows | None:
    """A FeatureRecord -> Rows (None when it has nothing to learn: fewer than 3 ids, or no answer)."""
    ids, k = rec.ids.long(), int(rec.prompt_len)
    m = len(ids)
    key = (int(rec.sample_idx), int(rec.question_idx))
    if kind == "feature-adapter":
        n = m - k
        if n < 1 or k < 1:
            return None
        answer = torch.ones(n, dtype=torch.bool)
        answer[0] = False  # the first answer token comes from the target's prefill; drafts start after it
        return Rows(key, rec.draft[:n].float(), None, ids[k:].clone(), answer, rec.target[k - 1 : m - 1].float(), None)
    if m < 3:
        return None
    feats = rec.layers if fused else rec.target
    T = m - 1
    labels = torch.full((T,), IGNORE, dtype=torch.long)
    labels[: T - 1] = ids[2:]
    answer = torch.zeros(T, dtype=torch.bool)
    answer[max(k - 1, 0) : T - 1] = True  # row i predicts ids[i + 2]: answer tokens after the first
    events = rec.events.float() if kind == "eagle+events" else None
    return Rows(key, feats[:T].float(), ids[1:].clone(), labels, answer, rec.target[1:m].float(), events)


def load_rows(store, path, kind: str, fused: bool) -> list[Rows]:
    if fused and not store.meta.get("layer_indices"):
        raise fail(path, "holds no low/mid/high-layer features (extract them, or train without --fused)")
    rows = []
    for i in range(len(store)):
        rec = store[i]
        if fused and rec.layers is None:
            raise fail(path, f"sample {rec.sample_idx} question {rec.question_idx}: no layer features (--fused)")
        r = make_rows(rec, kind, fused)
        if r is not None:
            rows.append(r)
    if not rows:
        raise fail(path, "no sequence to learn from (every answer is empty)")
    return rows


def split_holdout(rows: list[Rows], fraction: float, path) -> tuple[list[Rows], list[Rows]]:
    """The last `fraction` of the samples (by sample index, all their questions together) -> eval."""
    samples = sorted({r.key[0] for r in rows})
    n_eval = math.ceil(len(samples) * fraction) if fraction > 0 else 0
    if n_eval < 1 or n_eval >= len(samples):
        raise fail(path, f"{len(samples)} sample(s): too few to hold out {fraction:.0%} for evaluation; pass "
                         "--eval-features (the test split's features)")  # fmt: skip
    held = set(samples[-n_eval:])
    return [r for r in rows if r.key[0] not in held], [r for r in rows if r.key[0] in held]


def collate(rows: list[Rows], device) -> dict:
    """Right-padded batch: inputs [B, T, F], tokens [B, T], labels [B, T] (IGNORE on padding), answer [B, T],
    next_feature [B, T, D], mask [B, T] (True on real rows), events [B, N, E] or None."""
    B, T = len(rows), max(len(r.labels) for r in rows)
    out = {"inputs": torch.zeros(B, T, rows[0].inputs.shape[-1]),
           "labels": torch.full((B, T), IGNORE, dtype=torch.long),
           "answer": torch.zeros(B, T, dtype=torch.bool), "mask": torch.zeros(B, T, dtype=torch.bool),
           "next_feature": torch.zeros(B, T, rows[0].next_feature.shape[-1]),
           "tokens": None if rows[0].tokens is None else torch.zeros(B, T, dtype=torch.long),
           "events": None}  # fmt: skip
    for b, r in enumerate(rows):
        n = len(r.labels)
        out["inputs"][b, :n] = r.inputs
        out["labels"][b, :n] = r.labels
        out["answer"][b, :n] = r.answer
        out["mask"][b, :n] = True
        out["next_feature"][b, :n] = r.next_feature
        if r.tokens is not None:
            out["tokens"][b, :n] = r.tokens
    if rows[0].events is not None:
        N = max(len(r.events) for r in rows)
        out["events"] = torch.zeros(B, N, rows[0].events.shape[-1])
        out["events_mask"] = torch.zeros(B, N, dtype=torch.bool)
        for b, r in enumerate(rows):
            out["events"][b, : len(r.events)] = r.events
            out["events_mask"][b, : len(r.events)] = True
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


# ---------------------------------------------------------------- the target's frozen parts


def load_target_parts(name: str) -> tuple[torch.nn.Embedding, torch.nn.Linear, dict]:
    """The target's input embeddings and LM head, frozen, read alone from its weight files (at 7B the rest is
    13 GB that training never needs), and its language model's config (`target_text_config`)."""
    from specalign.models import locate
    from specalign.models.loading import read_config, weight_files

    path = locate(name)
    text = target_text_config(read_config(path))
    wanted = {"embed": None, "head": None}
    for f in weight_files(path):
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as sf:
                    for key in sf.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                        role = _part_role(key)
                        if role and wanted[role] is None:
                            wanted[role] = sf.get_tensor(key)
            else:
                state = torch.load(f, map_location="cpu", weights_only=True)
                for key, t in state.items():
                    role = _part_role(key)
                    if role and wanted[role] is None:
                        wanted[role] = t
        except Exception as e:
            raise fail(f, f"cannot read weights ({one_line(e)})") from None
    if wanted["embed"] is None:
        raise fail(path, "no input embeddings (embed_tokens.weight) in its weights")
    if wanted["head"] is None:  # tied embeddings
        wanted["head"] = wanted["embed"]
    embed = torch.nn.Embedding.from_pretrained(wanted["embed"].float(), freeze=True)
    head = torch.nn.Linear(wanted["head"].shape[1], wanted["head"].shape[0], bias=False)
    head.weight = torch.nn.Parameter(wanted["head"].float(), requires_grad=False)
    return embed, head, text


def _part_role(key: str) -> str | None:
    if "vision" in key or "visual" in key:
        return None
    if key.endswith("embed_tokens.weight"):
        return "embed"
    if key.endswith("lm_head.weight"):
        return "head"
    return None


# ---------------------------------------------------------------- loss and metrics


def step_outputs(head, batch: dict, steps: int, noise: float = 0.0, generator=None) -> list[torch.Tensor]:
    """The head's outputs per unrolled step, [B, T, D] each (the feature adapter has one step)."""
    x = batch["inputs"]
    if noise > 0:
        x = x + (torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1) * noise
    if isinstance(head, FeatureAdapter):
        return [head(x)]
    return head.unroll(x, batch["tokens"], batch["events"], batch["mask"], steps=steps,
                       events_mask=batch.get("events_mask"))  # fmt: skip


def head_loss(head, batch: dict, outs: list[torch.Tensor], feature_loss: float) -> tuple[torch.Tensor, dict]:
    """Weighted sum over steps of CE through the frozen LM head (+ feature_loss x smooth-L1 on the next feature);
    step j counts rows i >= j only (a chain of j steps needs j earlier positions). Returns (loss, step-0 stats)."""
    total, weight = 0.0, 0.0
    labels = batch["labels"]
    stats = {}
    for j, out in enumerate(outs):
        lab = labels.clone()
        lab[:, :j] = IGNORE
        if not (lab != IGNORE).any():
            continue
        logits = head.logits(out)
        loss = F.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=IGNORE)
        if feature_loss > 0:
            keep = lab != IGNORE
            loss = loss + feature_loss * F.smooth_l1_loss(out[keep].float(), batch["next_feature"][keep].float())
        w = STEP_DECAY**j
        total, weight = total + w * loss, weight + w
        if j == 0:
            keep = batch["answer"] & (labels != IGNORE)
            stats = {"hits": int((logits.argmax(-1)[keep] == labels[keep]).sum()), "rows": int(keep.sum())}
    return total / max(weight, 1e-9), stats


def chain_accepted(hits: list[torch.Tensor], starts: torch.Tensor) -> torch.Tensor:
    """hits[j] bool [B, T]: the step-j draft at row i equals the target's token (False where no label).
    starts bool [B, T]: rows a chain starts from. -> accepted length long [B, T] at the starts (0 elsewhere): the
    number of leading steps j whose draft at row start + j was right."""
    B, T = starts.shape
    alive = starts.clone()
    accepted = torch.zeros(B, T, dtype=torch.long, device=starts.device)
    for j, h in enumerate(hits):
        shifted = torch.zeros_like(h)
        shifted[:, : T - j] = h[:, j:]
        alive &= shifted
        accepted += alive.long()
    return accepted


@torch.no_grad()
def evaluate(head, rows: list[Rows], depth: int, batch_size: int, device, bf16: bool = True) -> dict:
    """Eval metrics on answer rows: loss (CE, step 0), top1, top5, cosine (to the next target feature, reference
    only), mean accepted length and tau = 1 + accepted of `depth`-step greedy chains, the acceptance rate at each
    depth (accepted d+1 / reached d+1), and counts."""
    head.eval()
    dev = torch.device(device)
    loss_sum = n = hit1 = hit5 = cos = 0.0
    acc_sum, starts_n = 0, 0
    reached = torch.zeros(depth)
    passed = torch.zeros(depth)
    for s in range(0, len(rows), batch_size):
        batch = collate(rows[s : s + batch_size], dev)
        with _autocast(dev.type, bf16):
            outs = step_outputs(head, batch, depth)
        labels, answer = batch["labels"], batch["answer"] & (batch["labels"] != IGNORE)
        logits0 = head.logits(outs[0])
        k = int(answer.sum())
        if not k:
            continue
        loss_sum += F.cross_entropy(logits0[answer], labels[answer], reduction="sum").item()
        top5 = logits0[answer].topk(min(5, logits0.shape[-1]), dim=-1).indices
        hit1 += (top5[:, 0] == labels[answer]).sum().item()
        hit5 += (top5 == labels[answer][:, None]).any(-1).sum().item()
        cos += F.cosine_similarity(outs[0][answer].float(), batch["next_feature"][answer].float(), dim=-1).sum().item()
        n += k
        valid = labels != IGNORE
        if isinstance(head, FeatureAdapter):  # the draft VLM's states do not depend on the adapter: hits repeat
            hits = [(logits0.argmax(-1) == labels) & valid] * depth
        else:
            hits = [(head.logits(o).argmax(-1) == labels) & valid for o in outs]
        accepted = chain_accepted(hits, answer)
        acc_sum += int(accepted[answer].sum())
        starts_n += k
        a = accepted[answer]
        for d in range(depth):
            reached[d] += int((a >= d).sum())
            passed[d] += int((a >= d + 1).sum())
    mean_acc = acc_sum / max(starts_n, 1)
    rates = [(p / r).item() if r else None for p, r in zip(passed, reached, strict=True)]
    return {"eval_loss": loss_sum / max(n, 1), "top1": hit1 / max(n, 1), "top5": hit5 / max(n, 1),
            "cosine": cos / max(n, 1), "accepted": mean_acc, "tau": 1 + mean_acc, "accept_at_depth": rates,
            "depth": depth, "rows": int(n)}  # fmt: skip


# ---------------------------------------------------------------- outputs


def _plots(task: Path, history: list[dict], kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ep, [h["train_loss"] for h in history], marker="o", label="train")
    axes[0].plot(ep, [h["eval_loss"] for h in history], marker="o", label="eval (answer rows, step 0)")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    axes[1].plot(ep, [h["train_top1"] for h in history], marker="o", label="train top-1")
    axes[1].plot(ep, [h["top1"] for h in history], marker="o", label="eval top-1")
    axes[1].plot(ep, [h["top5"] for h in history], marker="o", linestyle="--", label="eval top-5")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="Next target token (teacher-forced)", ylim=(0, 1))
    axes[2].plot(ep, [h["tau"] for h in history], marker="o", color="C3")
    axes[2].set(xlabel="epoch", ylabel="1 + mean accepted", title=f"Offline chain tau (depth {history[0]['depth']})")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(f"{kind} head")
    fig.tight_layout()
    save_png(fig, task / "training_curves.png")
    plt.close(fig)


def _results_md(res: dict) -> str:
    b = res["best"] or {}
    rates = " / ".join("-" if r is None else f"{r:.2f}" for r in b.get("accept_at_depth", []))
    lines = [f"# Draft head training ({res['kind']}): {res['task_dir']}", "",
             f"status: {res['status']}; best epoch {res['best_epoch']}; eval top-1 {b.get('top1', 0):.2%}, top-5 "
             f"{b.get('top5', 0):.2%}; offline chain tau {b.get('tau', 0):.2f} (depth {b.get('depth', '?')}, "
             f"acceptance by depth {rates}); {res['parameters']:,} parameters; {res['seconds']:.1f} s", "",
             "| epoch | train loss | train top-1 | eval loss | top-1 | top-5 | tau | cosine |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for h in res["history"]:
        lines.append(f"| {h['epoch']} | {h['train_loss']:.4f} | {h['train_top1']:.2%} | {h['eval_loss']:.4f} | "
                     f"{h['top1']:.2%} | {h['top5']:.2%} | {h['tau']:.3f} | {h['cosine']:.3f} |")  # fmt: skip
    lines += ["", "Cosine similarity to the next target feature is shown for reference; acceptance is counted in "
              "tokens."]  # fmt: skip
    return "\n".join(lines) + "\n"


def result_lines(res: dict) -> list[str]:
    """The console summary of a head training run (results.json's dict)."""
    b = res["best"]
    return [f"{res['status']}: {res['kind']} best epoch {res['best_epoch']}  top-1 {b['top1']:.4f}  top-5 "
            f"{b['top5']:.4f}  offline tau {b['tau']:.3f} (depth {b['depth']})  ({res['seconds']:.1f} s, "
            f"{res['parameters']:,} parameters)",
            f"task folder: {res['task_dir']}"]  # fmt: skip


# ---------------------------------------------------------------- training


def store_identity(store, path) -> dict:
    """A features folder by path, size and the hash of its metadata (the store records what made it)."""
    meta = json.dumps(store.meta, sort_keys=True, default=str).encode()
    return {"path": str(Path(path).resolve()) if path else None, "records": len(store),
            "meta_sha256": hashlib.sha256(meta).hexdigest()}  # fmt: skip


def check_stores(train_meta: dict, eval_meta: dict, eval_path) -> None:
    """The eval features must come from the same target and draft as the train ones."""
    for key in SAME_MODELS:
        a, b = train_meta.get(key), eval_meta.get(key)
        if a is not None and b is not None and a != b:
            raise fail(eval_path, f"{key} {b!r} differs from the train features' {a!r} (features of another model?)")


def check_tokenizer(meta: dict, path) -> None:
    """The target's tokenizer today must be the one the features were made with (ids would mean other words)."""
    from specalign.align.features import tokenizer_fingerprint
    from specalign.models import inspect_model

    recorded = meta.get("tokenizer_fingerprint")
    if recorded:
        now = tokenizer_fingerprint(inspect_model(meta["target"])["tokenizer"])
        if now != recorded:
            raise fail(path, f"made with another tokenizer of {meta['target']} (fingerprints {recorded[:12]}, now "
                             f"{now[:12]})")  # fmt: skip


def train_head(cfg: HeadTrainConfig, progress: bool = True) -> dict:
    """Open and check the features, then train (`run_training`). Returns results.json's dict."""
    store = open_features(cfg.features)
    eval_store = open_features(cfg.eval_features) if cfg.eval_features else None
    return run_training(cfg, store, eval_store, progress)


def _head_config(cfg: HeadTrainConfig, meta: dict, text: dict, embed, lm_head, rows: list[Rows], path) -> HeadConfig:
    """The head's shape: one layer of the target's language model, checked against the features."""
    D, V = lm_head.in_features, lm_head.out_features
    hidden, vocab = meta.get("target_hidden_size", D), meta.get("target_vocab_size", V)
    if (hidden, vocab) != (D, V):
        raise fail(path, f"features of a target with hidden {hidden}, vocab {vocab}; {meta.get('target')} has "
                         f"hidden {D}, vocab {V} now (retrained or replaced?)")  # fmt: skip
    width = rows[0].inputs.shape[-1]
    want = rows[0].inputs.shape[-1] if cfg.kind == "feature-adapter" else (3 * D if cfg.fused else D)
    if width != want:
        raise fail(path, f"features of width {width}, expected {want}")
    target = {"name": meta.get("target"), "hidden_size": D, "vocab_size": V,
              "tokenizer": meta.get("tokenizer_fingerprint")}  # fmt: skip
    events = rows[0].events.shape[-1] if cfg.kind == "eagle+events" else None
    draft = width if cfg.kind == "feature-adapter" else None
    hc = HeadConfig.for_target(cfg.kind, {**text, "hidden_size": D, "vocab_size": V}, fused=cfg.fused,
                               events_size=events, draft_size=draft, target=target, layout=cfg.layout)  # fmt: skip
    if cfg.intermediate_size:
        hc.intermediate_size = cfg.intermediate_size
    elif cfg.kind == "feature-adapter":
        hc.intermediate_size = 2 * D
    return hc


def run_training(cfg: HeadTrainConfig, store, eval_store=None, progress: bool = True) -> dict:
    """Train on `store` (a FeatureStore: meta, len, [i] -> FeatureRecord), evaluate each epoch on `eval_store`
    (default: the held-out last samples of `store`), keep the best epoch (offline tau) in best_model/."""
    cfg = dataclasses.replace(cfg, device=cfg.device or _default_device())
    meta = store.meta
    if not meta.get("target"):
        raise fail(cfg.features, "the features do not name their target model (meta 'target')")
    rows = load_rows(store, cfg.features, cfg.kind, cfg.fused)
    if eval_store is not None:
        check_stores(meta, eval_store.meta, cfg.eval_features)
        train_rows, eval_rows = rows, load_rows(eval_store, cfg.eval_features, cfg.kind, cfg.fused)
    else:
        train_rows, eval_rows = split_holdout(rows, cfg.holdout, cfg.features)
    check_tokenizer(meta, cfg.features)
    embed, lm_head, text = load_target_parts(meta["target"])
    hc = _head_config(cfg, meta, text, embed, lm_head, rows, cfg.features)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in COSMETIC}
    settings.update(features=store_identity(store, cfg.features),
                    eval_features=None if eval_store is None else store_identity(eval_store, cfg.eval_features),
                    head=dataclasses.asdict(hc))  # fmt: skip
    task = task_dir(cfg.out, cfg.kind, cfg.resume)
    with shared_run_folder(task, settings, cfg.overwrite) as task:
        return _train(cfg, hc, embed, lm_head, train_rows, eval_rows, task, progress)


def _train(cfg, hc: HeadConfig, embed, lm_head, train_rows, eval_rows, task: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    t0 = time.time()
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    head = build_head(hc).to(device)
    attach_parts(head, embed.to(device), lm_head.to(device))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.epochs * steps_per_epoch))
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    history, best, best_epoch, start, seconds_before = [], None, 0, 1, 0.0
    if (task / STATE_NAME).is_file():
        try:
            state = torch.load(task / STATE_NAME, map_location="cpu", weights_only=True)
            head.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            noise_gen.set_state(state["noise_rng"])
        except Exception as e:
            raise fail(task / STATE_NAME, f"cannot resume from this state ({one_line(e)})") from None
        history, best, best_epoch = state["history"], state["best"], state["best_epoch"]
        start, seconds_before = state["epoch"] + 1, state["seconds"]
    steps = 1 if hc.kind == "feature-adapter" else cfg.ttt_steps
    status = "completed"
    bar = tqdm(range(start, cfg.epochs + 1), desc=f"train-head {hc.kind}", unit="epoch", initial=start - 1,
               total=cfg.epochs, disable=not progress)  # fmt: skip
    for epoch in bar:
        head.train()
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        loss_sum, n_steps, hits, n_rows = 0.0, 0, 0, 0
        for s in range(0, len(order), cfg.batch_size):
            batch = collate([train_rows[i] for i in order[s : s + cfg.batch_size].tolist()], device)
            with _autocast(device.type, cfg.bf16):
                outs = step_outputs(head, batch, steps, cfg.noise, noise_gen)
                loss, stats = head_loss(head, batch, outs, cfg.feature_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item()
            n_steps += 1
            hits += stats.get("hits", 0)
            n_rows += stats.get("rows", 0)
        train_loss = loss_sum / max(n_steps, 1)
        if not math.isfinite(train_loss):
            status = "nan"
            break
        metrics = evaluate(head, eval_rows, cfg.depth, cfg.batch_size, device, cfg.bf16)
        row = {"epoch": epoch, "train_loss": train_loss, "train_top1": hits / max(n_rows, 1),
               "lr": sched.get_last_lr()[0], **metrics}  # fmt: skip
        history.append(row)
        if best is None or (metrics["tau"], metrics["top1"]) > (best["tau"], best["top1"]):
            best, best_epoch = {**metrics, "epoch": epoch}, epoch
            save_head(task / "best_model", head)
        bar.set_postfix(loss=f"{train_loss:.3f}", top1=f"{metrics['top1']:.3f}", tau=f"{metrics['tau']:.2f}")
        state = {"model": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "noise_rng": noise_gen.get_state(), "epoch": epoch, "history": history, "best": best,
                 "best_epoch": best_epoch, "seconds": seconds_before + time.time() - t0}  # fmt: skip
        with atomic_path(task / STATE_NAME) as tmp:
            torch.save(state, tmp)
    bar.close()
    seconds = seconds_before + time.time() - t0
    res = {"task_dir": str(task), "status": status, "kind": hc.kind, "config": dataclasses.asdict(cfg),
           "head_config": dataclasses.asdict(hc), "parameters": count_parameters(head),
           "train_sequences": len(train_rows), "eval_sequences": len(eval_rows), "history": history,
           "best_epoch": best_epoch, "best": best, "seconds": seconds}  # fmt: skip
    write_json(task / "results.json", res)
    write_bytes(task / "RESULTS.md", _results_md(res).encode())
    if history:
        _plots(task, history, hc.kind)
    if (task / "best_model").is_dir():
        link_latest(task)
    if status == "nan":
        kept = f"best checkpoint (epoch {best_epoch}) kept in {task / 'best_model'}" if best else "no checkpoint"
        raise SpecalignError(f"{task}: training stopped at epoch {epoch}: loss became NaN/inf; {kept}")
    return res
