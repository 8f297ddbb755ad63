"""Train the TokenAdapter on draft/target token pairs with the reference study's recipe.

AdamW (lr 1e-4, weight decay 0.01), linear warm-up then cosine decay, batch 32, 50 epochs, early stopping on test
top-1 (patience 10), loss = `adapter_loss` (draft[:, :-1] predicts target[:, 1:], pad 0 ignored, smoothing 0.1).

Writes `<out>/<task_name>_YYYYMMDD_HHMMSS/`: best_model/ (save_adapter), results.json, RESULTS.md,
training_curves.png, loss_curve.png, accuracy_curve.png, last_state.pt (for `resume=<task dir>`) and
run_settings.json (a resume with other data or hyper-parameters is refused); `<out>/latest` links the newest.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from specalign.align.token_adapter import (
    TokenAdapter,
    TokenAdapterConfig,
    adapter_loss,
    save_adapter,
    shifted_targets,
)
from specalign.align.tokens import TokenPairs, pad_batch, pairs_identity, read_pairs
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import atomic_path, ensure_dir, save_png, write_bytes, write_json
from specalign.options import option
from specalign.runs import LATEST_NAME, require_positive, shared_run_folder

STATE_NAME = "last_state.pt"
REFERENCE_VOCAB = 32010  # the reference adapter's vocabulary (Llama's 32000 + specials): pairs that do not say theirs
MAX_VOCAB = 1 << 20  # above every real tokenizer (the largest are ~256k); guards against a typo allocating terabytes
# fields that change where things go, speed or resumability, never the trained weights
COSMETIC = ("train", "test", "task_name", "out", "device", "resume", "checkpoint_every_s", "compile", "overwrite")
PAD_ID = 0
EVAL_LOGITS = 1 << 29  # logit elements per evaluation batch on the GPU


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class AdapterTrainConfig:
    train: str = option(help="training token pairs: an extraction/store folder or a reference JSON")
    test: str = option(help="test token pairs (early stopping and the reported metrics)")
    task_name: str = option("adapter", help="task folders are named <task-name>_<timestamp>")
    out: str = option("task", help="task folders go here, with a `latest` link to the newest")
    epochs: int = option(50, help="passes over the training pairs")
    batch_size: int = option(32, help="pairs per step")
    lr: float = option(1e-4, help="AdamW learning rate")
    weight_decay: float = option(0.01, help="AdamW weight decay")
    warmup_steps: int = option(100, help="linear warm-up steps before the cosine decay")
    early_stopping: int = option(10, help="patience in epochs on test top-1; 999 disables")
    vocab_size: int | None = option(None, help="adapter vocabulary (default: the extraction's vocab sizes; for "
                                    "reference JSON, largest token id + 1; the reference used 32010)")  # fmt: skip
    embed_dim: int = option(512, help="adapter width")
    num_layers: int = option(4, help="transformer layers")
    num_heads: int = option(8, help="attention heads (must divide --embed-dim)")
    ffn_dim: int = option(2048, help="feed-forward width")
    dropout: float = option(0.1, help="dropout in the transformer layers")
    token_bias: bool = option(False, help="the reference's token_bias variant (64 positions)")
    max_len: int | None = option(None, help="tokens per pair (default: the longest pair, capped at the adapter's "
                                 "128 positions, 64 with --token-bias)")  # fmt: skip
    seed: int = option(0, help="initial weights and pair order")
    device: str | None = option(None, help="cuda | cpu (default: cuda when available)")
    bf16: bool = option(True, help="bf16 autocast (CUDA only)")
    resume: str | None = option(None, help="a task folder to continue (same data and settings)")
    checkpoint_every_s: float = option(
        30.0, flag="--checkpoint-every", help="seconds between last_state.pt saves (resume points; 0 = every epoch)"
    )
    compile: bool = option(False, help="torch.compile the training step, CUDA graphs on one GPU (~1 min to compile)")
    overwrite: bool = option(False, help="with --resume: start that task folder over if its settings differ")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "early_stopping", "embed_dim", "num_layers", "num_heads", "ffn_dim"):
            require_positive(name, getattr(self, name))
        require_positive("warmup_steps", self.warmup_steps, 0)
        require_positive("vocab_size", self.vocab_size, 2)
        if self.vocab_size is not None and self.vocab_size > MAX_VOCAB:
            raise SpecalignError(f"--vocab-size: at most {MAX_VOCAB}, got {self.vocab_size}")
        require_positive("max_len", self.max_len, 2)
        for name in ("lr", "weight_decay", "dropout", "checkpoint_every_s"):
            require_finite(name, getattr(self, name), positive=name == "lr")
        if self.dropout >= 1:
            raise SpecalignError(f"--dropout: must be below 1, got {self.dropout}")
        if self.embed_dim % self.num_heads:
            raise SpecalignError(f"--embed-dim {self.embed_dim} is not divisible by --num-heads {self.num_heads}")


def require_finite(name: str, value, positive: bool = False) -> None:
    """A float option: a finite number, >= 0 (> 0 with positive): `--lr: must be above 0, got -1.0`."""
    flag = "--" + ("checkpoint-every" if name == "checkpoint_every_s" else name.replace("_", "-"))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecalignError(f"{flag}: expected a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise SpecalignError(f"{flag}: must be {'above' if positive else 'at least'} 0, got {value}")


# ---------------------------------------------------------------- data


def _load(path: str, role: str) -> TokenPairs:
    pairs = read_pairs(path)
    if not len(pairs):
        raise fail(path, f"{role} set has no token pairs")
    return pairs


def _tensors(pairs: TokenPairs, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> draft [N, L], target [N, L], both right-padded with 0 and truncated to L."""
    return pad_batch(pairs.draft, PAD_ID, length), pad_batch(pairs.target, PAD_ID, length)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _autocast(device_type: str, bf16: bool):
    """bf16 autocast on CUDA only (CPU autocast is slower than fp32 there)."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16 and device_type == "cuda")


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    adapter: TokenAdapter, draft: torch.Tensor, target: torch.Tensor, cfg: AdapterTrainConfig,
    return_argmax: bool = False,
) -> dict:  # fmt: skip
    """Teacher-forced metrics over draft/target [N, L] with the training shift (logits[i] vs target[i+1]).

    - top1 / top5: what `topk_accuracy` measures, pooled over all non-pad labels;
    - baseline: fraction of those label positions j = i+1 where the draft token at the same position already
      equals the target token (draft[j] == target[j]): what "use the draft as is" gets, the reference's baseline;
    - per_position: top-1 at draft position i (predicting target[i+1]), None where no label exists;
    - argmax (return_argmax only): the adapter's guesses, long [N, L] on the CPU (column i guesses target[i+1]).
    """
    adapter.eval()
    device = torch.device(cfg.device)
    L = draft.shape[1]
    # bigger batches on the GPU only change the speed: as many rows as keep the logits near 2 GB of fp32
    batch_size = cfg.batch_size if device.type == "cpu" else max(cfg.batch_size, EVAL_LOGITS // max(
        1, L * adapter.config.target_vocab_size))  # fmt: skip
    # sums stay on the device until the end: one host sync per evaluation, not four per batch
    loss_sum, hit1, hit5, base = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(4))
    pos_hit = torch.zeros(L, dtype=torch.long, device=device)
    pos_n = torch.zeros(L, dtype=torch.long, device=device)
    guesses = []
    for s in range(0, len(draft), batch_size):
        d, t = draft[s : s + batch_size].to(device), target[s : s + batch_size].to(device)
        with _autocast(device.type, cfg.bf16):
            logits = adapter(d, check_ids=False)
        logits = logits.float()
        if return_argmax:
            guesses.append(logits.argmax(-1).cpu())
        labels = shifted_targets(d, t, PAD_ID)
        keep = labels != PAD_ID
        # the loss is a mean over a batch's labels: weighted by their count to pool over the whole set
        k = keep.sum()
        loss_sum += torch.where(k > 0, adapter_loss(logits, d, t, PAD_ID).double() * k, 0.0)  # no label: NaN mean
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # [B, L, 5]
        hit = (top[..., 0] == labels) & keep
        hit1 += hit.sum()
        hit5 += ((top == labels[..., None]).any(-1) & keep).sum()
        same = torch.zeros_like(keep)
        same[:, :-1] = d[:, 1:] == t[:, 1:]
        base += (same & keep).sum()
        pos_hit += hit.sum(0)
        pos_n += keep.sum(0)
    n_lab = int(pos_n.sum())
    n = max(n_lab, 1)
    per_pos = [(h / c) if c else None for h, c in zip(pos_hit.tolist(), pos_n.tolist(), strict=True)]
    out = {"test_loss": float(loss_sum) / n, "top1": float(hit1) / n, "top5": float(hit5) / n,
           "baseline": float(base) / n, "labels": n_lab, "per_position": per_pos}  # fmt: skip
    if return_argmax:
        out["argmax"] = torch.cat(guesses) if guesses else torch.zeros_like(draft)
    return out


# ---------------------------------------------------------------- training


def step_loss(adapter: TokenAdapter, draft: torch.Tensor, target: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The training loss of one batch, draft/target [B, L] -> scalar (what `compile=True` hands to torch.compile)."""
    # no attention mask: padding is on the right, so causal attention never lets a real token see it
    with _autocast(draft.device.type, bf16):
        logits = adapter(draft, check_ids=False)  # the ids were checked once for the whole set
    return adapter_loss(logits, draft, target, PAD_ID)


def compiled_step_loss(device: torch.device, world: int = 1):
    """`step_loss` through torch.compile. One process on a GPU also replays each step as a CUDA graph: at the
    reference's batch of 32 a step is all kernel launches. Under DDP the gradient hooks run outside any graph, so
    ranks compile without."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" and world == 1 else None
    return torch.compile(step_loss, mode=mode)


def train_epoch(adapter, opt, sched, draft: torch.Tensor, target: torch.Tensor, order: torch.Tensor,
                cfg: AdapterTrainConfig, loss_fn=step_loss) -> float:  # fmt: skip
    """One pass over the pairs in `order` (indices into draft/target [N, L], all on the training device).

    Returns the mean training loss, NaN/inf when the loss diverged (the pass stops there). The loss is summed on
    the device and looked at every 50 steps, so the GPU never waits on the host in between.
    """
    rank, world = _rank_world()
    adapter.train()
    total = torch.zeros((), device=draft.device)
    count = 0
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s : s + cfg.batch_size][rank::world]  # under DDP each rank takes its share of the global batch
        d, t = draft[idx], target[idx]
        torch.compiler.cudagraph_mark_step_begin()  # a CUDA-graphed step may reuse the last step's buffers
        loss = loss_fn(adapter, d, t, cfg.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        opt.step()
        sched.step()
        total += loss.detach()
        count += 1
        if count % 50 == 0 and _any_rank(~torch.isfinite(total)):
            break
    if world > 1:
        torch.distributed.all_reduce(total)
        total /= world
    return (total / max(count, 1)).item()


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _any_rank(flag: torch.Tensor) -> bool:
    """True when the flag is set on any rank (every rank must stop together, or the others hang in DDP)."""
    if _rank_world()[1] > 1:
        flag = flag.float()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def _init_distributed(cfg: AdapterTrainConfig) -> tuple[int, int]:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): one process per GPU (or CPU process, gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if torch.device(cfg.device).type == "cuda":
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(cfg.device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world


# ---------------------------------------------------------------- outputs


def task_dir(out: str | Path, name: str, resume: str | None = None) -> Path:
    """A new task folder `<out>/<name>_<timestamp>/`, or the `resume` one (which must hold a resume point)."""
    if resume:
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise fail(path, f"cannot resume: no {STATE_NAME} in this directory")
        return path
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    root = ensure_dir(out)
    path, n = root / f"{name}_{stamp}", 1
    while path.exists():  # two runs in the same second
        path, n = root / f"{name}_{stamp}_{n}", n + 1
    return ensure_dir(path)


def _plots(task: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]

    def loss(ax):
        ax.plot(ep, [h["train_loss"] for h in history], marker="o", label="train")
        ax.plot(ep, [h["test_loss"] for h in history], marker="o", label="test")
        ax.set(xlabel="epoch", ylabel="loss", title="Loss")
        ax.legend()

    def acc(ax):
        ax.plot(ep, [h["top1"] for h in history], marker="o", label="top-1")
        ax.plot(ep, [h["top5"] for h in history], marker="o", label="top-5")
        ax.plot(ep, [h["baseline"] for h in history], linestyle="--", label="baseline (draft as is)")
        ax.set(xlabel="epoch", ylabel="accuracy", title="Test accuracy (next target token)", ylim=(0, 1))
        ax.legend()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    loss(axes[0])
    acc(axes[1])
    fig.tight_layout()
    save_png(fig, task / "training_curves.png")
    plt.close(fig)
    for name, draw in (("loss_curve.png", loss), ("accuracy_curve.png", acc)):
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax)
        fig.tight_layout()
        save_png(fig, task / name)
        plt.close(fig)


def below_baseline(best: dict | None) -> bool:
    """An adapter whose test top-1 is not above the draft-as-is baseline is of no use (flagged everywhere)."""
    return best is not None and best["top1"] <= best["baseline"]


BELOW_BASELINE = "below baseline: the adapter does no better than the draft's own tokens"


def _results_md(res: dict) -> str:
    b = res["best"] or {}
    lines = [f"# TokenAdapter training: {res['task_dir']}", "",
             f"status: {res['status']}; best epoch {res['best_epoch']}; test top-1 {b.get('top1', 0):.2%}, "
             f"top-5 {b.get('top5', 0):.2%}, baseline {b.get('baseline', 0):.2%}; {res['seconds']:.1f} s", "",
             *([f"**{BELOW_BASELINE}**", ""] if res["below_baseline"] else []),
             "| epoch | train loss | test loss | top-1 | top-5 |", "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for h in res["history"]:
        lines.append(f"| {h['epoch']} | {h['train_loss']:.4f} | {h['test_loss']:.4f} | {h['top1']:.2%} "
                     f"| {h['top5']:.2%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def result_lines(res: dict) -> list[str]:
    """The console summary of a training run (results.json's dict)."""
    b = res["best"]
    flag = f"  ({BELOW_BASELINE})" if res.get("below_baseline") else ""
    return [f"{res['status']}: best epoch {res['best_epoch']}  top-1 {b['top1']:.4f}  top-5 {b['top5']:.4f}  "
            f"baseline {b['baseline']:.4f}  ({res['seconds']:.1f} s){flag}",
            f"task folder: {res['task_dir']}"]  # fmt: skip


def _finish(task: Path, cfg: AdapterTrainConfig, history, best, best_epoch, status, seconds, extra) -> dict:
    res = {"task_dir": str(task), "status": status, "config": dataclasses.asdict(cfg), **extra,
           "history": history, "best_epoch": best_epoch, "best": best, "final": best,
           "below_baseline": below_baseline(best), "seconds": seconds}  # fmt: skip
    if _rank_world()[0] != 0:  # under DDP rank 0 writes; every rank returns the same results
        return res
    write_json(task / "results.json", res)
    write_bytes(task / "RESULTS.md", _results_md(res).encode())
    if history:
        _plots(task, history)
    if (task / "best_model").is_dir():
        link_latest(task)
    return res


def link_latest(task: Path) -> Path:
    """Point `<out>/latest` (a relative link beside the task folders) at `task`, atomically: link a temp name,
    then rename it over the old link, so a reader always finds one whole link."""
    link = task.parent / LATEST_NAME
    if link.exists() and not link.is_symlink():
        raise fail(link, "exists and is not a link; rename it (task folders keep a `latest` link here)")
    tmp = task.parent / f".{LATEST_NAME}.{os.getpid():08d}.tmp"  # a temp name fsutil.remove_temp_files knows
    tmp.unlink(missing_ok=True)
    os.symlink(task.name, tmp)
    os.replace(tmp, link)
    return link


def star_task(task: str | Path) -> Path:
    """Link a finished task folder under `<out>/starred/` (a relative link); returns the link."""
    task = Path(task).resolve()  # `task/latest` stars the folder it points at
    if not (task / "results.json").is_file():
        raise fail(task, "not a task folder (results.json is missing)")
    starred = ensure_dir(task.parent / "starred")
    link = starred / task.name
    if not link.is_symlink():
        os.symlink(os.path.relpath(task, starred), link)
    return link


# ---------------------------------------------------------------- training


@dataclass
class TrainData:
    """The checked inputs of one training run: token tensors [N, L] on the CPU and what the task folder records."""

    train_d: torch.Tensor
    train_t: torch.Tensor
    test_d: torch.Tensor
    test_t: torch.Tensor
    vocab: int
    length: int
    settings: dict


def resolve_vocab(cfg: AdapterTrainConfig, files: dict[str, TokenPairs]) -> int:
    """The adapter's vocabulary: --vocab-size, else the one the files record (an extraction's manifest), else the
    reference's 32010; every token id must fit, or the file and the id are named."""
    known = {path: p.vocab_size for path, p in files.items() if p.vocab_size is not None}
    if cfg.vocab_size is not None:
        vocab, source = cfg.vocab_size, "--vocab-size"
        for path, v in known.items():
            if v != vocab:
                raise fail(path, f"vocab size {v} (its manifest) differs from --vocab-size {vocab}")
    elif known:
        (first, vocab), *rest = known.items()
        for path, v in rest:
            if v != vocab:
                raise fail(path, f"vocab size {v} differs from {vocab} of {first} (pairs from other models?)")
        source = f"the vocab size in {first}'s manifest"
    else:
        vocab, source = REFERENCE_VOCAB, "the reference vocabulary; the files do not record theirs: pass --vocab-size"
    for path, pairs in files.items():
        hit = pairs.first_id_at_least(vocab)
        if hit:
            raise fail(path, f"{hit[0]}: token id {hit[1]} is outside the vocabulary of {vocab} ({source})")
    return vocab


def load_data(cfg: AdapterTrainConfig) -> TrainData:
    """Read and check both pair files (the cheap checks, before a model exists)."""
    train, test = _load(cfg.train, "train"), _load(cfg.test, "test")
    vocab = resolve_vocab(cfg, {cfg.train: train, cfg.test: test})
    max_positions = TokenAdapterConfig(vocab_size=vocab, token_bias=cfg.token_bias).max_positions
    if cfg.max_len is not None:
        length = cfg.max_len
    else:
        longest = max(len(s) for s in train.draft + train.target + test.draft + test.target)
        length = min(max(longest, 2), max_positions)
    for path, pairs, role in ((cfg.train, train, "learn from"), (cfg.test, test, "score")):
        if not pairs.labels(length, PAD_ID):
            raise fail(path, f"no target token to {role}: every pair's target has fewer than 2 non-pad tokens "
                             "(empty generations?)")  # fmt: skip
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in COSMETIC}
    settings.update(train=pairs_identity(cfg.train), test=pairs_identity(cfg.test), vocab=vocab, length=length)
    train_d, train_t = _tensors(train, length)
    test_d, test_t = _tensors(test, length)
    return TrainData(train_d, train_t, test_d, test_t, vocab, length, settings)


def train_adapter(cfg: AdapterTrainConfig, progress: bool = True) -> dict:
    """Train, evaluate each epoch on the test set, keep the best (test top-1) in best_model/. Returns results.json's
    dict. NaN/inf loss -> stops, keeps the best checkpoint and results, raises SpecalignError.

    A task folder remembers its settings (hyper-parameters, the pair files' hashes): resuming it with others is
    refused on one line (or, with overwrite, it starts over)."""
    cfg = dataclasses.replace(cfg, device=cfg.device or _default_device())
    rank, world = _init_distributed(cfg)
    data = load_data(cfg)
    task = task_dir(cfg.out, cfg.task_name, cfg.resume) if rank == 0 else None
    with shared_run_folder(task, data.settings, cfg.overwrite, rank, world) as task:  # rank 0 names it
        return _train(cfg, data, task, rank, world, progress)


def _train(cfg: AdapterTrainConfig, data: TrainData, task: Path, rank: int, world: int, progress: bool) -> dict:
    from tqdm.auto import tqdm

    t0 = time.time()
    vocab, length = data.vocab, data.length
    acfg = TokenAdapterConfig(vocab_size=vocab, embed_dim=cfg.embed_dim, num_layers=cfg.num_layers,
                              num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                              token_bias=cfg.token_bias, pad_id=PAD_ID)  # fmt: skip
    acfg.max_positions = max(acfg.max_positions, length)
    device = torch.device(cfg.device)
    train_d, train_t = data.train_d.to(device), data.train_t.to(device)  # 52k x 50 ids are 42 MB: keep them there
    test_d, test_t = data.test_d, data.test_t

    torch.manual_seed(cfg.seed)
    adapter = TokenAdapter(acfg).to(device)  # same seed: the same initial weights on every rank
    model = adapter  # what the training step runs: under DDP, the wrapper that averages gradients
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(adapter, device_ids=ids)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")  # fmt: skip
    steps_per_epoch = math.ceil(len(train_d) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.epochs * steps_per_epoch))

    history: list[dict] = []
    best, best_epoch, bad_epochs, start = None, 0, 0, 1
    seconds_before = 0.0
    if (task / STATE_NAME).is_file():  # a resume (a task folder started over with overwrite has none)
        try:
            state = torch.load(task / STATE_NAME, map_location="cpu", weights_only=True)
            adapter.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        except Exception as e:  # truncated file, or a state saved with another model size / vocabulary
            raise fail(task / STATE_NAME, f"cannot resume from this state ({one_line(e)})") from None
        history, best, best_epoch = state["history"], state["best"], state["best_epoch"]
        bad_epochs, start, seconds_before = state["bad_epochs"], state["epoch"] + 1, state["seconds"]
    extra = {"vocab_size": vocab, "max_len": length, "train_pairs": len(train_d), "test_pairs": len(test_d),
             "adapter_config": dataclasses.asdict(acfg)}  # fmt: skip

    loss_fn = compiled_step_loss(device, world) if cfg.compile else step_loss
    last_save = time.time()
    status = "completed"
    bar = tqdm(range(start, cfg.epochs + 1), desc=cfg.task_name, unit="epoch", initial=start - 1, total=cfg.epochs,
               disable=rank != 0 or not progress)  # fmt: skip
    for epoch in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # per-epoch order: a resume repeats it
        order = torch.randperm(len(train_d), generator=gen).to(device)
        train_loss = train_epoch(model, opt, sched, train_d, train_t, order, cfg, loss_fn)
        if not math.isfinite(train_loss):
            status = "nan"
            break
        metrics = evaluate(adapter, test_d, test_t, cfg)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": sched.get_last_lr()[0],
               **{k: metrics[k] for k in ("test_loss", "top1", "top5", "baseline")}}  # fmt: skip
        history.append(row)
        if best is None or metrics["top1"] > best["top1"]:
            best, best_epoch, bad_epochs = {**metrics, "epoch": epoch}, epoch, 0
            if rank == 0:
                save_adapter(adapter, task / "best_model")
        else:
            bad_epochs += 1
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", top1=f"{metrics['top1']:.3f}", best=best_epoch)
        stop = bad_epochs >= cfg.early_stopping
        # a kill loses at most checkpoint_every_s of training; the final state is always written
        if rank == 0 and (stop or epoch == cfg.epochs or time.time() - last_save >= cfg.checkpoint_every_s):
            state = {"model": adapter.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": torch.get_rng_state(), "epoch": epoch, "history": history, "best": best,
                     "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                     "seconds": seconds_before + time.time() - t0}  # fmt: skip
            with atomic_path(task / STATE_NAME) as tmp:
                torch.save(state, tmp)
            last_save = time.time()
        if stop:
            status = "early_stopped"
            break
    bar.close()

    res = _finish(task, cfg, history, best, best_epoch, status, seconds_before + time.time() - t0, extra)
    if status == "nan":
        kept = f"best checkpoint (epoch {best_epoch}) kept in {task / 'best_model'}" if best else "no checkpoint"
        raise SpecalignError(f"{task}: training stopped at epoch {epoch}: loss became NaN/inf; {kept}")
    return res
