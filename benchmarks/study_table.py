"""Benchmark: the reference study's table at full scale on minidsec (5,208 train / 1,100 test clips, 1 s).

For each workflow (1q, 10q, 50q): the workflow's extraction through our engine (`specalign workflow NAME --until
extract`); our fast recipe (batch 2048, lr 8e-4, compiled) on those pairs; the rest of the workflow, i.e. the
reference adapter and recipe (512 wide, 4 layers, batch 32, lr 1e-4, 50 epochs, early stopping 10) with the
bundled models; then the adapter inside the real decoder (`speculate --token-adapter`, greedy, gamma 4) beside the
plain draft VLM, on the first test answers. Each row keeps the wall time of each stage. Every stage resumes (the
workflow's own resume, a finished fast task is reused), and the result file is rewritten after each stage, so a
killed run keeps its finished rows and the same command continues it; `--stop-after` ends the run cleanly between
stages.
Writes benchmarks/results/study_table.json.

    python benchmarks/study_table.py [--world DIR] [--runs DIR] [--workflows 1q,10q,50q] [--recipes reference,fast]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speculate_mini import speculate_row  # noqa: E402

from specalign.align.token_adapter import load_adapter  # noqa: E402
from specalign.align.train import AdapterTrainConfig, train_adapter  # noqa: E402
from specalign.align.workflow import WORKFLOWS, WorkflowConfig, run_workflow  # noqa: E402
from specalign.decode.run import SpeculateConfig  # noqa: E402
from specalign.evaluate.adapter import evaluate_adapter  # noqa: E402
from specalign.fsutil import read_json, write_json  # noqa: E402
from specalign.models import bundled_path  # noqa: E402
from specalign.world.build import WorldConfig, build_world  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# the reference study's rows (its README and reports); None where it reported nothing
STUDY = {
    "1q": {"train_pairs": 5208, "test_pairs": 1100, "baseline": 0.0158, "top1": 0.279, "top5": None, "hours": 3},
    "10q": {"train_pairs": 52080, "test_pairs": 11000, "baseline": 0.0805, "top1": 0.2148, "top5": 0.515,
            "hours": 20},
    "50q": {"train_pairs": 260400, "test_pairs": 55000, "baseline": None, "top1": None, "top5": None, "hours": 72},
    "ar_comparison": {"mean_consecutive_matches": 0, "total_match_rate": 0.062, "first_token_accuracy": 0.0},
    "end_to_end_speedup": 1.03,
}  # fmt: skip
FAST = {"batch_size": 2048, "lr": 8e-4, "compile": True}  # benchmarks/adapter_train.py's best setting


def log(*a) -> None:
    print(*a, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="/tmp/study_world", help="built here when missing (the default minidsec "
                   "size, with the bundled models' tokenizer)")  # fmt: skip
    p.add_argument("--runs", default="/tmp/study_runs", help="workflow folders and speculate runs")
    p.add_argument("--train-clips", type=int, default=5208, help="train clips of a world built here")
    p.add_argument("--test-clips", type=int, default=1100, help="test clips of a world built here")
    p.add_argument("--workflows", default="1q,10q,50q")
    p.add_argument("--recipes", default="reference,fast", help="adapter recipes per workflow (reference, fast)")
    p.add_argument("--extract-batch", type=int, default=500, help="prompts per extraction batch")
    p.add_argument("--answers", type=int, default=100, help="test answers decoded per speculate row")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="the reference recipe's training step compiled (the "
                   "same recipe, faster)")  # fmt: skip
    p.add_argument("--stop-after", type=float, default=None, help="seconds: start no new stage after this")
    p.add_argument("--result", default=str(RESULTS / "study_table.json"))
    args = p.parse_args()
    t_start = time.time()
    world, runs = Path(args.world), Path(args.runs)
    result = read_json(args.result) if Path(args.result).is_file() else {}
    result.update({
        "benchmark": "study_table",
        "machine": {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                    else f"cpu {platform.machine()}", "cpus": os.cpu_count(), "torch": torch.__version__},
        "setup": {"draft": "mini-draft", "target": "mini-target", "world": "minidsec 1 s, 5,208 train / 1,100 test "
                  "clips, seed 0, the bundled models' tokenizer", "max_new_tokens": 50,
                  "extract_batch": args.extract_batch, "reference_recipe": "workflow defaults: embed 512, 4 layers, "
                  "8 heads, FFN 2048, batch 32, lr 1e-4, 50 epochs, early stopping 10", "fast_recipe": FAST,
                  "speculate": {"answers": args.answers, "gamma": args.gamma, "greedy": True}},
        "study": STUDY,
    })  # fmt: skip
    result.setdefault("rows", {})

    def save():
        write_json(args.result, result, flat_numbers=True)

    def out_of_time() -> bool:
        late = args.stop_after is not None and time.time() - t_start > args.stop_after
        if late:
            log(f"--stop-after {args.stop_after:.0f} s reached: stopping between stages (re-run to continue)")
        return late

    train_split, test_split = world / "my_egpt_dsec_train_1s", world / "my_egpt_dsec_seq_1s"
    t0 = time.time()
    summary = build_world(WorldConfig(out=str(world), train=args.train_clips, test=args.test_clips, mp4=False,
                                      workers=os.cpu_count() or 2,
                                      tokenizer=str(bundled_path("mini-target") / "tokenizer.json")),
                          progress=False)  # fmt: skip
    if "world" not in result or summary["seconds"] > 5:  # keep the first build's time, not a resume's no-op
        result["world"] = {"clips": sum(s["clips"] for s in summary["splits"].values()),
                           "build_seconds": round(time.time() - t0, 1), "workers": os.cpu_count()}  # fmt: skip
    save()
    log(f"world: {result['world']}")
    for name in args.workflows.split(","):
        if name not in WORKFLOWS:
            p.error(f"--workflows: unknown workflow {name!r}")
        row = result["rows"].setdefault(name, {})
        run = runs / name  # the workflow's folder holds the pairs both recipes train on
        workflow = WorkflowConfig(name=name, train=str(train_split), test=str(test_split), out=str(runs),
                                  batch_size=args.extract_batch, compile=args.compile)  # fmt: skip
        command = (f"specalign workflow {name} --train {train_split} --test {test_split} --out {runs} "
                   f"--batch-size {args.extract_batch}" + " --compile" * args.compile)  # fmt: skip
        # extraction first (the workflow's own, stopped there), so the fast recipe's row comes before the reference
        # recipe's long training
        if "extract" not in row:
            if out_of_time():
                break
            run_workflow(replace(workflow, until="extract"), progress=False)
            row["extract"] = {
                split: {"pairs": m["pairs"], "seconds": m["seconds_rank0"]}
                for split, m in ((s, read_json(run / f"extract_{s}" / "manifest.json")) for s in ("train", "test"))
            }
            row["extract"]["command"] = command + " --until extract"
            save()
            log(f"{name} extract: {row['extract']}")
        if "fast" in args.recipes and "fast" not in row:
            if out_of_time():
                break
            t0 = time.time()
            res = train_adapter(AdapterTrainConfig(train=str(run / "extract_train"), test=str(run / "extract_test"),
                                                   task_name=f"{name}_fast", out=str(run / "task_fast"), **FAST),
                                progress=False)  # fmt: skip
            row["fast"] = _recipe_row(Path(res["task_dir"]), run, time.time() - t0)
            row["fast"]["command"] = (f"specalign train --train {run}/extract_train --test {run}/extract_test "
                                      f"--batch-size {FAST['batch_size']} --lr {FAST['lr']} --compile")  # fmt: skip
            save()
            log(f"{name} fast: {row['fast']}")
        if "reference" in args.recipes and "reference" not in row:
            if out_of_time():
                break
            t0 = time.time()
            s = run_workflow(workflow, progress=False)  # the extraction is done: it resumes into training
            row["reference"] = _recipe_row(Path(s["task"]), run, time.time() - t0)
            row["reference"]["command"] = command
            save()
            log(f"{name} reference: {row['reference']}")
        recipe = next((r for r in ("reference", "fast") if r in row), None)
        if "speculate" not in row and recipe:
            if out_of_time():
                break
            q = WORKFLOWS[name]
            rows = []
            for label, adapter in (("draft VLM", None), (f"draft VLM + {recipe} adapter", row[recipe]["task"])):
                cfg = SpeculateConfig(dataset=str(test_split), out=str(run / f"speculate_{len(rows)}"), questions=q,
                                      max_samples=max(1, args.answers // q), gamma=args.gamma, token_adapter=adapter,
                                      repeats=1, hf_baseline=False, overwrite=True)  # fmt: skip
                rows.append({k: v for k, v in speculate_row(label, cfg).items() if k != "stage_seconds"})
                samples = read_json(Path(cfg.out) / "results.json")["samples"]
                rows[-1]["traces"] = [{"tokens": len(s["target_tokens"]), "accepted": s["accepted_per_round"],
                                       "drafted": s["drafted_per_round"]} for s in samples]  # fmt: skip
            row["speculate"] = rows
            save()
            log(f"{name} speculate: " + "; ".join(f"{r['source']}: alpha {r['alpha']:.3f} tau {r['tau']:.2f} "
                                                  f"speedup {r['speedup_vs_target_alone']['median']:.2f}x"
                                                  for r in rows))  # fmt: skip
    result["seconds_this_call"] = round(time.time() - t_start, 1)
    save()


def _recipe_row(task: Path, run: Path, wall: float) -> dict:
    """One recipe's numbers: pairs, teacher-forced top-1/top-5 and the study's AR comparison on the whole test
    split, and the wall time of each stage (extraction from its manifests, training from the task)."""
    t0 = time.time()
    ev = evaluate_adapter(task / "best_model", run / "extract_test")
    res = read_json(task / "results.json")
    extract = {split: read_json(run / f"extract_{split}" / "manifest.json") for split in ("train", "test")}
    return {
        "task": str(task), "train_pairs": res.get("train_pairs"), "test_pairs": ev["count"],
        "parameters": sum(t.numel() for t in load_adapter(task / "best_model").parameters()),
        "epochs_run": len(res["history"]), "best_epoch": res["best_epoch"],
        "status": res["status"], **{k: v for k, v in ev["teacher_forced"].items() if k != "per_position"},
        "ar_comparison": ev["independent_generations_AR_comparison"],
        "seconds": {"extract_train": extract["train"]["seconds_rank0"],
                    "extract_test": extract["test"]["seconds_rank0"],
                    "train": round(res["seconds"], 1), "evaluate": round(time.time() - t0, 1),
                    "wall": round(wall, 1)},
    }  # fmt: skip


if __name__ == "__main__":
    main()
