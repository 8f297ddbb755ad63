"""`specalign evaluate` and `specalign debug-tokens`: how well a TokenAdapter maps draft tokens to target tokens.

Two kinds of numbers, kept apart on purpose:

- teacher-forced (what the adapter was trained for): the logits after draft[: i + 1] predict target[i + 1];
  top-1 / top-5 / per-position accuracy, against the baseline "use the draft token as is";
- the reference's AR comparison on *independent generations*: the adapter's predictions along the draft's own
  generation compared with the target's own generation from the first predicted position on. One early mismatch
  ends every consecutive run here, which is why the reference saw 0 consecutive matches; a real speculative
  decoder resyncs the draft on the target's accepted prefix instead, so this is NOT an acceptance rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from specalign.align.token_adapter import load_adapter, shifted_targets
from specalign.align.tokens import pad_batch, read_pairs
from specalign.align.train import BELOW_BASELINE, AdapterTrainConfig, below_baseline
from specalign.align.train import evaluate as train_evaluate
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import ensure_dir, write_bytes
from specalign.options import option
from specalign.runs import require_positive

PAD_ID = 0
ADAPTER_HELP = ("a TokenAdapter: a best_model/ folder, a task folder, or a folder of task folders (its `latest`); "
                "or a reference .pt checkpoint")  # fmt: skip


@dataclass
class EvaluateConfig:
    pairs: str = option(help="token pairs: an extraction/store folder or a reference JSON")
    token_adapter: str = option("task", help=ADAPTER_HELP)
    out: str | None = option(None, help="write the full metrics JSON here")
    device: str | None = option(None, help="cuda | cpu (default: cuda when available, with bf16 autocast)")

    def __post_init__(self):
        if not str(self.token_adapter).strip():
            raise SpecalignError("--token-adapter: empty path")


@dataclass
class DebugTokensConfig:
    pairs: str = option(help="token pairs: an extraction/store folder or a reference JSON")
    token_adapter: str = option("task", help=ADAPTER_HELP)
    tokenizer: str | None = option(None, help="tokenizer.json, or a model folder holding one (e.g. "
                                   "assets/mini-target/), to show tokens as text")  # fmt: skip
    samples: int = option(5, help="pairs shown")
    out: str = option("TOKEN_ALIGNMENT_ANALYSIS.md", help="Markdown file to write")

    def __post_init__(self):
        require_positive("samples", self.samples)


def resolve_adapter(path: str | Path) -> Path:
    """The TokenAdapter a path means: a checkpoint file or best_model/ folder as is, a task folder's best_model/,
    or, for a folder of task folders, its `latest` task's (else the newest task with a best_model/)."""
    from specalign.align.token_adapter import CONFIG_NAME, WEIGHTS_NAME
    from specalign.runs import resolve_best_model

    def is_adapter(p: Path) -> bool:
        return p.is_file() or (p / WEIGHTS_NAME).is_file() or (p / CONFIG_NAME).is_file()

    return resolve_best_model(path, is_adapter, "TokenAdapter")


def latest_adapter(root: str | Path = "task") -> Path:
    """best_model/ of the latest task folder under root."""
    return resolve_adapter(root)


def _read_fitting(pairs_path, adapter):
    """The pairs at `pairs_path`, checked once against the adapter (the passes after skip the per-batch check)."""
    pairs = read_pairs(pairs_path)
    if not len(pairs):
        raise fail(pairs_path, "no token pairs")
    hit = pairs.first_id_at_least(adapter.config.vocab_size)
    if hit:
        raise fail(pairs_path, f"{hit[0]}: token id {hit[1]} is outside the adapter vocabulary "
                               f"[0, {adapter.config.vocab_size}) (pairs from another tokenizer?)")  # fmt: skip
    return pairs


def load_tokenizer(path: str | Path):
    """A `tokenizers` tokenizer from tokenizer.json, or from a model folder holding one."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise fail(path, "no tokenizer.json here" if path.is_dir() else "file not found")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # not JSON, truncated, or another format
        raise fail(file, f"not a readable tokenizer.json ({one_line(e)})") from None


@torch.inference_mode()
def predictions(adapter, draft: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Adapter argmax after each draft prefix: long [N, L]; column i is the guess for target[i + 1]."""
    out = []
    for s in range(0, len(draft), batch_size):
        out.append(adapter(draft[s : s + batch_size]).argmax(-1))
    return torch.cat(out)


def evaluate_adapter(adapter_path: str | Path, pairs_path: str | Path, batch_size: int = 64,
                     device: str | None = None) -> dict:  # fmt: skip
    """Teacher-forced metrics and the reference's AR comparison of `adapter_path` on the pairs at `pairs_path`,
    on `device` (default: cuda when available, with bf16 autocast as in training)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = load_adapter(adapter_path, device=device)
    pairs = _read_fitting(pairs_path, adapter)
    length = min(max(max(len(d), len(t)) for d, t in zip(pairs.draft, pairs.target, strict=True)),
                 adapter.config.max_positions)  # fmt: skip
    draft, target = pad_batch(pairs.draft, PAD_ID, length), pad_batch(pairs.target, PAD_ID, length)
    cfg = AdapterTrainConfig(train="", test="", batch_size=batch_size, device=device)
    tf = train_evaluate(adapter, draft, target, cfg, return_argmax=True)  # one pass gives metrics and guesses
    pred = tf["argmax"]
    label = shifted_targets(draft, target, PAD_ID)  # the training shift: guess i is for target[i + 1]
    keep = label != PAD_ID
    hits = (pred == label) & keep

    # the reference's comparison of two independent generations, from the first predicted position
    consecutive, first, total, n_tok = [], 0, 0, 0
    for r in range(len(draft)):
        n = int(keep[r].sum())
        row = hits[r, :n].tolist()
        run = next((i for i, h in enumerate(row) if not h), n)
        consecutive.append(run)
        first += int(bool(row) and row[0])
        total += sum(row)
        n_tok += n
    return {
        "adapter": str(Path(adapter_path).resolve()),
        "pairs": str(Path(pairs_path).resolve()),
        "count": len(draft),
        "teacher_forced": {
            "top1": round(tf["top1"], 4),
            "top5": round(tf["top5"], 4),
            "baseline": round(tf["baseline"], 4),
            "improvement": round(tf["top1"] - tf["baseline"], 4),
            "below_baseline": below_baseline(tf),
            "per_position": [None if p is None else round(p, 4) for p in tf["per_position"]],
        },
        "independent_generations_AR_comparison": {
            "note": "adapter predictions along the draft's own generation vs the target's own generation; "
            "not an acceptance rate (no resync)",
            "mean_consecutive_matches": round(sum(consecutive) / max(len(consecutive), 1), 3),
            "first_token_accuracy": round(first / max(len(draft), 1), 4),
            "total_match_rate": round(total / max(n_tok, 1), 4),
        },
    }


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """`specalign evaluate`: the metrics of `evaluate_adapter`, also written to cfg.out when given."""
    from specalign.fsutil import write_json

    if cfg.out:
        ensure_dir(Path(cfg.out).parent)  # an unwritable place fails before the work
    r = evaluate_adapter(resolve_adapter(cfg.token_adapter), cfg.pairs, device=cfg.device)
    if cfg.out:
        write_json(cfg.out, r)
    return r


def evaluate_lines(r: dict) -> list[str]:
    """The console summary of `evaluate_adapter`'s result."""
    tf, ar = r["teacher_forced"], r["independent_generations_AR_comparison"]
    flag = f"  ({BELOW_BASELINE})" if tf["below_baseline"] else ""
    return [f"adapter {r['adapter']} on {r['count']} pairs",
            f"  teacher-forced: top-1 {tf['top1']:.4f}  baseline {tf['baseline']:.4f}  "
            f"improvement {tf['improvement']:+.4f}{flag}",
            f"  AR comparison of independent generations (not acceptance): mean consecutive matches "
            f"{ar['mean_consecutive_matches']}, first token {ar['first_token_accuracy']:.4f}, "
            f"total {ar['total_match_rate']:.4f}"]  # fmt: skip


def run_debug_tokens(cfg: DebugTokensConfig) -> Path:
    """`specalign debug-tokens`: writes cfg.out and returns its path."""
    return debug_tokens(resolve_adapter(cfg.token_adapter), cfg.pairs, cfg.out, cfg.tokenizer, cfg.samples)


def debug_tokens(
    adapter_path, pairs_path, out: str | Path, tokenizer_file: str | None = None, samples: int = 5
) -> Path:
    """TOKEN_ALIGNMENT_ANALYSIS.md at `out`: draft / adapter / target token by token for the first `samples` pairs,
    decoded with `tokenizer_file` (tokenizer.json or a folder holding one) when given."""
    ensure_dir(Path(out).parent)  # an unwritable place fails before the work
    tok = load_tokenizer(tokenizer_file) if tokenizer_file else None
    adapter = load_adapter(adapter_path)
    pairs = _read_fitting(pairs_path, adapter)

    def show(i: int) -> str:
        return tok.id_to_token(i) if tok is not None and tok.id_to_token(i) is not None else str(i)

    lines = ["# Token alignment analysis", "", f"adapter: `{adapter_path}`  ", f"pairs: `{pairs_path}`", "",
             "Position i: the draft token, the adapter's guess for the *next* target token (after draft[: i + 1]),",
             "and that target token (target[i + 1]).", ""]  # fmt: skip
    for r in range(min(samples, len(pairs))):
        d, t = pairs.draft[r], pairs.target[r]
        n = min(len(d), len(t), adapter.config.max_positions)
        pred = predictions(adapter, pad_batch([d[:n]], PAD_ID, n))[0].tolist()
        if pairs.query and pairs.query[r]:
            lines += [f"## Pair {r}: {pairs.query[r]}", ""]
        else:
            lines += [f"## Pair {r}", ""]
        if tok is not None:
            lines += [f"- draft:  {tok.decode(d)}", f"- target: {tok.decode(t)}", ""]
        lines += ["| i | draft[i] | adapter → | target[i+1] | match |", "|---|---|---|---|---|"]
        for i in range(n - 1):
            ok = "✓" if pred[i] == t[i + 1] else ""
            lines.append(f"| {i} | `{show(d[i])}` | `{show(pred[i])}` | `{show(t[i + 1])}` | {ok} |")
        lines.append("")
    write_bytes(out, "\n".join(lines).encode())
    return Path(out)
