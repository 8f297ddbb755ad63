"""Benchmark: extraction and adapter training on one GPU and on two GPUs of one host, through torchrun.

Each part runs twice through the same launcher, `torch.distributed.run`: with one process, then with one process
per GPU (`--gpus`). The parts:
- extract_7b: extraction's batch loop at Video-LLaVA-7B shape (`extract_7b.py`: 8-frame CLIP encode, shared-prefix
  prefill, 10 questions x 50-token answers, random weights). Each rank runs `--batches` batches of `--samples`
  samples; a run's pairs/s is all ranks' pairs over the slowest rank's time. Goal: >= 1.9x on two GPUs.
- extract_mini: `specalign extract` on a minidsec split with the bundled mini models (each rank takes every
  WORLD_SIZE-th job, rank 0 merges): wall seconds, and whether the two runs' pairs.jsonl are byte-identical.
- train: `specalign train`'s `train_adapter` (DDP, NCCL between GPUs) on synthetic learnable pairs at the 10q
  scale (52,000 x 50 tokens, the reference-size adapter; `adapter_train.py`'s pairs): seconds per epoch over
  `--epochs` epochs (evaluation included), goal >= 1.8x, and both runs' test top-1 per epoch.
Writes benchmarks/results/multi_gpu.json: a row per part and world size ("world_size": 1 or 2), and the scaling.

    python benchmarks/multi_gpu.py [--parts extract_7b,extract_mini,train] [--gpus 2] [--result PATH] [--tiny]
    python benchmarks/multi_gpu.py --smoke

--tiny: tiny shapes and sizes on the GPUs (what tests/test_multi_gpu.py runs on two GPUs); --smoke: the same in CPU
processes over gloo (checks the script and the launcher). Neither times anything worth reporting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specalign.fsutil import write_json  # noqa: E402

PARTS = ("extract_7b", "extract_mini", "train")
GOALS = {"extract_7b": 1.9, "train": 1.8}  # speed-up on two GPUs over one
# the 10q scale, as adapter_train.py and study_table.py run it; --tiny (and --smoke) shrink every size
# the global batch: 1,024 pairs a step keeps each of two GPUs busy (adapter_train.py: 72 ms a step on one H200)
TRAIN = dict(pairs=52_000, test_pairs=5_200, length=50, vocab=32_010, batch_size=1024)
TINY_TRAIN = dict(pairs=256, test_pairs=64, length=8, vocab=64, batch_size=32)
TINY_ADAPTER = dict(embed_dim=32, num_layers=1, num_heads=2, ffn_dim=64)


def launch(world: int, args: list[str], smoke: bool, port: int) -> dict:
    """`args` under torch.distributed.run with `world` processes -> rank 0's RESULT line (a dict)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if smoke else dict(os.environ)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
           *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"benchmarks/multi_gpu.py: {' '.join(args[:3])} with {world} process(es) failed:\n"
                 f"{proc.stderr[-3000:]}")  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else {}


# ---- workers: run under torch.distributed.run, one per rank -----------------------------------------------------


def _rank_device(cpu: bool) -> tuple[int, int, str]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cpu:
        return rank, world, "cpu"
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank, world, "cuda"


def worker_extract_7b(spec: dict) -> None:
    """Every rank times its own batches on its own GPU; rank 0 prints the run's pairs/s."""
    import extract_7b as e7

    rank, world, device = _rank_device(spec["cpu"])
    torch.distributed.init_process_group("gloo" if device == "cpu" else "nccl")
    e7.shape.DEVICE = device
    target, tower, hidden = e7.models(tiny=spec["tiny"])
    S, questions = spec["samples"], spec["questions"]
    engine, *batch = e7.batch_inputs(target, S, questions, spec["prefix"], spec["suffix"], spec["new_tokens"], hidden)
    e7.run_batch(engine, tower, *batch, 4)  # warm-up: captures the decode graph
    e7.shape.sync()
    torch.distributed.barrier()  # the ranks start the timed batches together
    t = time.perf_counter()
    for _ in range(spec["batches"]):
        e7.run_batch(engine, tower, *batch, spec["new_tokens"])
    e7.shape.sync()
    mine = {"pairs": S * questions * spec["batches"], "seconds": time.perf_counter() - t}
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    if rank == 0:
        pairs, slowest = sum(r["pairs"] for r in every), max(r["seconds"] for r in every)
        row = {"pairs": pairs, "seconds": round(slowest, 3), "pairs_per_s": round(pairs / slowest, 1),
               "rank_seconds": [round(r["seconds"], 3) for r in every]}  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)
    torch.distributed.destroy_process_group()


def worker_train(spec: dict) -> None:
    """`train_adapter` under torchrun (it sets up DDP itself); rank 0 prints wall time and the curve."""
    from specalign.align.train import AdapterTrainConfig, train_adapter

    rank, _, device = _rank_device(spec["cpu"])
    cfg = AdapterTrainConfig(**spec["config"], device=device)
    t = time.perf_counter()
    res = train_adapter(cfg, progress=False)
    seconds = time.perf_counter() - t
    if rank == 0:
        curve = [{k: round(row[k], 4) for k in ("epoch", "train_loss", "test_loss", "top1")} for row in res["history"]]
        print("RESULT " + json.dumps({"seconds": round(seconds, 2), "curve": curve}), flush=True)


WORKERS = {"extract_7b": worker_extract_7b, "train": worker_train}


# ---- the parts: each launched with one process, then with one per GPU -------------------------------------------


def part_extract_7b(args, gpus: list[int]) -> dict:
    spec = {"cpu": args.smoke, "tiny": args.tiny, "samples": args.samples, "questions": 10, "prefix": 2060,
            "suffix": 20, "new_tokens": 50, "batches": args.batches}  # fmt: skip
    if args.tiny:
        spec.update(samples=2, questions=2, prefix=40, suffix=6, new_tokens=4, batches=1)
    rows = []
    for world in gpus:
        res = launch(world, [__file__, "--worker", "extract_7b", "--spec", json.dumps(spec)], args.smoke, 29531)
        rows.append({"world_size": world, **res})
        print("extract_7b", rows[-1], flush=True)
    return {"setup": spec, "rows": rows}


def part_extract_mini(args, gpus: list[int]) -> dict:
    from specalign.world.build import WorldConfig, build_world

    with tempfile.TemporaryDirectory() as tmp:
        clips = 4 if args.tiny else args.mini_clips
        build_world(WorldConfig(out=f"{tmp}/world", train=0, test=clips, clips_per_sequence=2, mp4=False),
                    progress=False)  # fmt: skip
        split = f"{tmp}/world/my_egpt_dsec_seq_1s"
        flags = ["--dataset", split, "--questions", "2" if args.tiny else "10", "--max-new-tokens",
                 "8" if args.tiny else "50", "--device", "cpu" if args.smoke else "cuda", "--quiet"]  # fmt: skip
        rows, pairs = [], {}
        for world in gpus:
            out = f"{tmp}/extract_{world}"
            t = time.perf_counter()
            launch(world, ["-m", "specalign", "extract", *flags, "--out", out], args.smoke, 29532)
            rows.append({"world_size": world, "seconds": round(time.perf_counter() - t, 2)})
            pairs[world] = Path(out, "pairs.jsonl").read_bytes()
            rows[-1]["pairs"] = len(pairs[world].splitlines())
            print("extract_mini", rows[-1], flush=True)
    return {"setup": {"clips": clips, "flags": flags[2:]}, "rows": rows,
            "pairs_identical": len(set(pairs.values())) == 1}  # fmt: skip


def part_train(args, gpus: list[int]) -> dict:
    from adapter_train import learnable_map, lr_for, synthetic_pairs

    from specalign.align.tokens import write_pairs

    size = TINY_TRAIN if args.tiny else TRAIN
    perm = learnable_map(size["vocab"])
    with tempfile.TemporaryDirectory() as tmp:
        write_pairs(synthetic_pairs(size["pairs"], size["length"], size["vocab"], perm, 2), Path(tmp) / "train")
        write_pairs(synthetic_pairs(size["test_pairs"], size["length"], size["vocab"], perm, 3), Path(tmp) / "test")
        config = {"train": f"{tmp}/train", "test": f"{tmp}/test", "epochs": 2 if args.tiny else args.epochs,
                  "batch_size": size["batch_size"], "lr": lr_for(size["batch_size"]), "early_stopping": 999,
                  "vocab_size": size["vocab"], "checkpoint_every_s": 1e9,
                  **(TINY_ADAPTER if args.tiny else {})}  # fmt: skip
        rows = []
        for world in gpus:
            spec = {"cpu": args.smoke, "config": {**config, "out": f"{tmp}/task_{world}"}}
            res = launch(world, [__file__, "--worker", "train", "--spec", json.dumps(spec)], args.smoke, 29533)
            rows.append({"world_size": world, "seconds_per_epoch": round(res["seconds"] / config["epochs"], 2),
                         **res})  # fmt: skip
            print("train", {k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    return {"setup": {**size, "epochs": config["epochs"], "global_batch": size["batch_size"]}, "rows": rows}


def scaling(part: str, rows: list[dict]) -> float | None:
    """Speed-up of the largest world over one process, by the part's own measure."""
    one, many = rows[0], rows[-1]
    if part == "extract_7b":
        return round(many["pairs_per_s"] / one["pairs_per_s"], 3)
    key = "seconds" if part == "extract_mini" else "seconds_per_epoch"
    return round(one[key] / many[key], 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--gpus", type=int, default=2, help="processes (one per GPU) of the second run of each part")
    p.add_argument("--samples", type=int, default=32, help="extract_7b: samples per batch (extract_7b.py's best)")
    p.add_argument("--batches", type=int, default=3, help="extract_7b: timed batches per rank")
    p.add_argument("--mini-clips", type=int, default=200, help="extract_mini: test clips in the minidsec split")
    p.add_argument("--epochs", type=int, default=5, help="train: epochs per run")
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "multi_gpu.json"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes and sizes on the GPUs: checks the two-GPU paths")
    p.add_argument("--smoke", action="store_true", help="--tiny in CPU processes over gloo: checks the script")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)  # set by `launch` under torchrun
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return
    args.tiny = args.tiny or args.smoke
    if unknown := set(args.parts.split(",")) - set(PARTS):
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    if not args.smoke and torch.cuda.device_count() < args.gpus:
        sys.exit(f"benchmarks/multi_gpu.py: needs {args.gpus} CUDA GPUs, this host has {torch.cuda.device_count()}"
                 " (or --smoke)")  # fmt: skip
    gpus = [1, args.gpus]
    result = {"benchmark": "multi_gpu",
              "machine": {"gpus": [torch.cuda.get_device_name(i) for i in range(args.gpus)] if not args.smoke
                          else "cpu processes over gloo (smoke run)", "torch": torch.__version__},
              "goals": GOALS, "parts": {}}  # fmt: skip
    runs = {"extract_7b": part_extract_7b, "extract_mini": part_extract_mini, "train": part_train}
    for part in args.parts.split(","):
        result["parts"][part] = runs[part](args, gpus)
        result["parts"][part]["scaling"] = scaling(part, result["parts"][part]["rows"])
        write_json(args.result, result)  # each part as it lands
    print({k: v["scaling"] for k, v in result["parts"].items()}, flush=True)


if __name__ == "__main__":
    main()
