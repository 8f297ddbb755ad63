"""`specalign workflow 1q|10q|50q`: extract (train and test) -> train the TokenAdapter -> evaluate.

Everything lands in one run folder, `runs/<name>/`: `extract_train/`, `extract_test/`, `task/`, `eval.json`,
`summary.json`, `workflow.log`, `run_settings.json`. Each stage resumes: extraction skips finished pairs, training
continues from its last epoch, and a finished stage is skipped, so re-running the same command after a kill picks
up where it stopped. A re-run with other settings (another world, other flags, retrained models) is refused on one
line naming the first difference; `--overwrite` starts it over.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from specalign.errors import SpecalignError
from specalign.fsutil import read_json, write_json
from specalign.options import option
from specalign.runs import OVERWRITE_HELP, require_positive, run_folder

WORKFLOWS = {"1q": 1, "10q": 10, "50q": 50}
STAGES = ("extract", "train", "evaluate")


@dataclass
class WorkflowConfig:
    name: str = option(choices=tuple(WORKFLOWS), help="1q | 10q | 50q: questions per sample")
    train: str = option(help="train split folder")
    test: str = option(help="test split folder")
    out: str = option("runs", help="<out>/<name>/ holds every stage and workflow.log")
    draft: str = option("mini-draft", help="a bundled model name or a checkpoint directory")
    target: str = option("mini-target", help="a bundled model name or a checkpoint directory")
    max_samples: int | None = option(None, help="only the first N train samples (default: all)")
    max_test_samples: int | None = option(None, help="only the first N test samples (default: all)")
    max_new_tokens: int = option(50, help="tokens generated per answer")
    batch_size: int = option(32, help="prompts per extraction batch")
    epochs: int = option(50, help="adapter training epochs")
    embed_dim: int = option(512, help="adapter width")
    num_layers: int = option(4, help="adapter transformer layers")
    num_heads: int = option(8, help="adapter attention heads")
    lr: float = option(1e-4, help="adapter learning rate")
    compile: bool = option(False, help="torch.compile the adapter's training step (GPU): the same recipe, faster")
    until: str = option("evaluate", choices=STAGES, help="the last stage to run; the same command without it "
                        "continues from there")  # fmt: skip
    device: str | None = option(None, help="cuda | cpu (default: cuda when available)")
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        if self.name not in WORKFLOWS:
            raise SpecalignError(f"workflow: unknown workflow {self.name!r}: choose {', '.join(WORKFLOWS)}")
        if self.until not in STAGES:
            raise SpecalignError(f"--until: unknown stage {self.until!r}: choose {', '.join(STAGES)}")
        for name in ("max_samples", "max_test_samples", "max_new_tokens", "batch_size", "epochs", "embed_dim",
                     "num_layers", "num_heads"):  # fmt: skip
            require_positive(name, getattr(self, name))


# fields that change only speed or where things go: a re-run may change them and still resume
COSMETIC = ("out", "device", "batch_size", "overwrite", "train", "test", "compile", "until")


@contextmanager
def _logger(path: Path, console: bool = True):
    """Log to `path` and (unless --quiet) the console for one run (handlers removed after, so a later run logs
    afresh)."""
    log = logging.getLogger(f"specalign.workflow.{path}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handlers = [logging.FileHandler(path)] + ([logging.StreamHandler()] if console else [])
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
    try:
        yield log
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


def run_workflow(cfg: WorkflowConfig, progress: bool = True) -> dict:
    """Extract (train and test), train, evaluate, each stage resumable. Every input is checked first (both splits,
    their questions, both models, the training values); a run folder holding a run with other settings (another
    world, other flags, retrained models) is refused on one line, or with overwrite started over."""
    from specalign.align.extract import ExtractConfig, extract, plan
    from specalign.align.train import AdapterTrainConfig, train_adapter
    from specalign.evaluate.adapter import evaluate_adapter

    run = Path(cfg.out) / cfg.name
    stages = {split: ExtractConfig(dataset=dataset, out=str(run / f"extract_{split}"), draft=cfg.draft,
                                   target=cfg.target, questions=WORKFLOWS[cfg.name], max_samples=limit,
                                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=cfg.device)
              for split, dataset, limit in (("train", cfg.train, cfg.max_samples),
                                            ("test", cfg.test, cfg.max_test_samples))}  # fmt: skip
    plans = {split: plan(c) for split, c in stages.items()}
    task_root = run / "task"
    train_cfg = AdapterTrainConfig(train=str(run / "extract_train"), test=str(run / "extract_test"),
                                   task_name=cfg.name, out=str(task_root), epochs=cfg.epochs, embed_dim=cfg.embed_dim,
                                   num_layers=cfg.num_layers, num_heads=cfg.num_heads, lr=cfg.lr,
                                   compile=cfg.compile, device=cfg.device)  # fmt: skip
    settings = {k: v for k, v in asdict(cfg).items() if k not in COSMETIC}
    settings.update({split: p.settings["dataset"] for split, p in plans.items()},
                    weights=plans["train"].settings["weights"])  # fmt: skip
    with run_folder(run, settings, cfg.overwrite), _logger(run / "workflow.log", console=progress) as log:
        t0 = time.time()
        for split, c in stages.items():
            log.info(f"[{cfg.name}] extract {split}: {c.dataset}")
            m = extract(c, progress=progress)
            log.info(f"[{cfg.name}] extract {split}: {m['pairs']} pairs, peak memory {m['peak_memory_gb']} GB")
        if cfg.until == "extract":
            return _stopped(cfg, run, log, t0)
        done = sorted(task_root.glob(f"{cfg.name}_*/results.json"))
        finished = [p for p in done if read_json(p).get("status") in ("completed", "early_stopped")]
        if finished:  # the run folder's settings equal this run's, so this is its own training
            result = read_json(finished[-1])
            log.info(f"[{cfg.name}] train: already finished in {finished[-1].parent}")
        else:
            started = sorted(p for p in task_root.glob(f"{cfg.name}_*") if (p / "last_state.pt").exists())
            log.info(f"[{cfg.name}] train" + (f": resuming {started[-1]}" if started else ""))
            result = train_adapter(replace(train_cfg, resume=str(started[-1]) if started else None),
                                   progress=progress)  # fmt: skip
        task = Path(result["task_dir"])
        if cfg.until == "train":
            return _stopped(cfg, run, log, t0, task)
        ev = evaluate_adapter(task / "best_model", run / "extract_test", device=cfg.device)
        write_json(run / "eval.json", ev)
        tf = ev["teacher_forced"]
        summary = {"workflow": cfg.name, "run": str(run), "task": str(task), "train_pairs": result.get("train_pairs"),
                   "test_pairs": ev["count"], "top1": tf["top1"], "baseline": tf["baseline"],
                   "improvement": tf["improvement"], "below_baseline": tf["below_baseline"],
                   "seconds": round(time.time() - t0, 1)}  # fmt: skip
        write_json(run / "summary.json", summary)
        log.info(f"[{cfg.name}] done: {json.dumps(summary)}")
    return summary


def _stopped(cfg: WorkflowConfig, run: Path, log, t0: float, task: Path | None = None) -> dict:
    """The summary of a run stopped after --until's stage (no summary.json: the workflow is not finished)."""
    log.info(f"[{cfg.name}] stopped after {cfg.until} (--until); the same command without --until continues")
    return {
        "workflow": cfg.name,
        "run": str(run),
        "until": cfg.until,
        "task": None if task is None else str(task),
        "seconds": round(time.time() - t0, 1),
    }


def summary_lines(s: dict) -> list[str]:
    """The console table of a finished workflow (its summary.json), or where a run stopped by --until is."""
    from specalign.align.train import BELOW_BASELINE

    if "until" in s:
        where = f"task folder: {s['task']}" if s["task"] else f"pairs in {s['run']}/extract_train, extract_test"
        return [f"{s['workflow']}: stopped after {s['until']} ({s['seconds']} s); {where}"]
    flag = f"  ({BELOW_BASELINE})" if s["below_baseline"] else ""
    return ["", "| workflow | train pairs | test pairs | baseline | adapter top-1 | improvement | seconds |",
            "|---|---|---|---|---|---|---|",
            f"| {s['workflow']} | {s['train_pairs']} | {s['test_pairs']} | {s['baseline']:.4f} | {s['top1']:.4f} | "
            f"{s['improvement']:+.4f} | {s['seconds']} |", f"task folder: {s['task']}{flag}"]  # fmt: skip
