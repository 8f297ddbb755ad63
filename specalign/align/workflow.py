"""`specalign workflow 1q|10q|50q`: extract (train and test) -> train the TokenAdapter -> evaluate.

Everything lands in one run folder, `runs/<name>/`: `extract_train/`, `extract_test/`, `task/`, `eval.json`,
`workflow.log`. Each stage resumes: extraction skips finished pairs, training continues from its last epoch, and a
finished stage is skipped, so re-running the same command after a kill picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from specalign.align.extract import OVERWRITE_HELP
from specalign.errors import SpecalignError
from specalign.fsutil import ensure_dir, write_json
from specalign.options import option

WORKFLOWS = {"1q": 1, "10q": 10, "50q": 50}


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
    device: str | None = option(None, help="cuda | cpu (default: cuda when available)")
    overwrite: bool = option(False, help=OVERWRITE_HELP)


def _logger(path: Path) -> logging.Logger:
    log = logging.getLogger(f"specalign.workflow.{path}")
    if not log.handlers:
        log.setLevel(logging.INFO)
        for h in (logging.FileHandler(path), logging.StreamHandler()):
            h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            log.addHandler(h)
    return log


def run_workflow(cfg: WorkflowConfig, progress: bool = True) -> dict:
    from specalign.align.extract import ExtractConfig, extract
    from specalign.align.train import AdapterTrainConfig, train_adapter
    from specalign.evaluate.adapter import evaluate_adapter

    if cfg.name not in WORKFLOWS:
        raise SpecalignError(f"workflow: unknown workflow {cfg.name!r}: choose 1q, 10q or 50q")
    run = ensure_dir(Path(cfg.out) / cfg.name)
    log = _logger(run / "workflow.log")
    t0 = time.time()
    device = {"device": cfg.device} if cfg.device else {}
    for split, dataset, limit in (("train", cfg.train, cfg.max_samples), ("test", cfg.test, cfg.max_test_samples)):
        log.info(f"[{cfg.name}] extract {split}: {dataset}")
        m = extract(ExtractConfig(dataset=dataset, out=str(run / f"extract_{split}"), draft=cfg.draft,
                                  target=cfg.target, questions=WORKFLOWS[cfg.name], max_samples=limit,
                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, **device),
                    progress=progress)  # fmt: skip
        log.info(f"[{cfg.name}] extract {split}: {m['pairs']} pairs, peak memory {m['peak_memory_gb']} GB")

    task_root = run / "task"
    done = sorted(task_root.glob(f"{cfg.name}_*/results.json"))
    finished = [p for p in done if json.loads(p.read_text()).get("status") in ("completed", "early_stopped")]
    if finished:
        result = json.loads(finished[-1].read_text())
        log.info(f"[{cfg.name}] train: already finished in {finished[-1].parent}")
    else:
        started = sorted(p for p in task_root.glob(f"{cfg.name}_*") if (p / "last_state.pt").exists())
        log.info(f"[{cfg.name}] train" + (f": resuming {started[-1]}" if started else ""))
        result = train_adapter(AdapterTrainConfig(
            train=str(run / "extract_train"), test=str(run / "extract_test"), task_name=cfg.name,
            out=str(task_root), epochs=cfg.epochs, embed_dim=cfg.embed_dim, num_layers=cfg.num_layers,
            num_heads=cfg.num_heads, lr=cfg.lr, resume=str(started[-1]) if started else None, **device))  # fmt: skip
    task = Path(result["task_dir"])
    ev = evaluate_adapter(task / "best_model", run / "extract_test")
    write_json(run / "eval.json", ev)
    tf = ev["teacher_forced"]
    summary = {"workflow": cfg.name, "run": str(run), "task": str(task), "train_pairs": result.get("train_pairs"),
               "test_pairs": ev["count"], "top1": tf["top1"], "baseline": tf["baseline"],
               "improvement": tf["improvement"], "seconds": round(time.time() - t0, 1)}  # fmt: skip
    write_json(run / "summary.json", summary)
    log.info(f"[{cfg.name}] done: {json.dumps(summary)}")
    return summary
