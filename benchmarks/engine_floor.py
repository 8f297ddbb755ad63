"""Benchmark: the target engine against the hardware floor at 7B shape, one machine start per run.

Video-LLaVA-7B's language model (Llama-7B, vocab 32,064, bf16, batch 1, random weights: right timing, no meaning)
after a 2,080-token prompt. Each run measures, on one start:
- decode ms/token for each engine setting (`SETTINGS`: CUDA graphs, torch.compile with inductor's tuning or the
  hand-written GEMV layers of `decode.gemv`, and the one-token attention through SDPA or the split-KV kernel over
  the used slots);
- prefill of the 2,080 tokens (a prompt without padding attends causally, SDPA's flash kernel): eager, eager over
  fused q/k/v and gate/up matmuls (`fuse`), and through the compiled layer halves (`compile_blocks`); the
  vision encode of 8 frames separately;
- verify of k = 2, 4, 8, 16 chained tokens and of 16/32/64-node trees (+ the root) on the fastest setting with its
  k-token steps compiled too, against that setting's own decode step.
The run is appended to the result file's `starts` (one entry per machine start), and `summary` holds the median
and the range over the starts of every number, beside the goals: decode <= 4.2 ms/token, prefill <= 50 ms, a
64-node tree verify <= 1.3 decode steps.

    python benchmarks/engine_floor.py [--result benchmarks/results/engine_floor.json] [--settings a,b]
                                      [--profile-verify] [--resume] [--smoke]
    python benchmarks/engine_floor.py --plot-only        # redraws engine_floor.png and the summary from the result
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_7b as d7  # noqa: E402 (llama_7b, sync_time, decode_loop, vision_ms: one place for the 7B setup)
import heads_7b as h7  # noqa: E402 (forced_tree: the tree blocks heads_7b times)

from specalign.decode import attention, gemv  # noqa: E402
from specalign.decode.engine import Engine, prefill, verify  # noqa: E402
from specalign.decode.speculative import tree_inputs, verify_tree  # noqa: E402
from specalign.fsutil import read_json, write_json  # noqa: E402

GOALS = {"decode_ms": 4.2, "prefill_ms": 50.0, "tree_64_vs_decode": 1.3}
MIN_STARTS = 3  # the rule: medians over at least three machine starts
# name -> Engine options; "compiled" settings pay a compile (and, tuned, inductor's coordinate-descent search)
SETTINGS = {
    "graphs": {},
    "graphs_split": {"attention": "split"},
    "compiled_tuned": {"compile": True, "tune": "coordinate"},
    "compiled_tuned_split": {"compile": True, "tune": "coordinate", "attention": "split"},
    "compiled_autotune_split": {"compile": True, "tune": "autotune", "attention": "split"},
    # the same, with its verify blocks' q/k/v and gate/up as one GEMM each (the one-token step as above)
    "compiled_autotune_split_fused": {"compile": True, "tune": "autotune", "attention": "split", "fuse": "blocks"},
    # the one-token step's layers as decode.gemv's Triton kernels (no compile), verify blocks as above
    "gemv_split_fused": {"gemv": True, "attention": "split", "fuse": "blocks"},
}
# what one run times unless --settings says otherwise: the candidates for the goal, so that a run (each tuned step
# compiles for a minute or more) fits one machine start
DEFAULT_SETTINGS = "compiled_autotune_split_fused,gemv_split_fused"
# how this version of the engine runs verify blocks, recorded with each start so that its numbers form their own
# series: the tree's mask and positions built on the device from its parents and, compiled, the blocks' layer
# halves compiled for each length (earlier starts: the mask from the host, then the halves' dynamic compile)
BLOCKS = ("device tree", "per length")
CHAINS = (2, 4, 8, 16)
REPEATS = 20


def decode_ms(engine: Engine, embeds, tokens: int) -> float:
    """Median ms/token of three greedy loops (a host read per token, as `target_generate` pipelines it)."""
    d7.decode_loop(engine, embeds, 8, True)  # captures (and compiles) the step
    return statistics.median(d7.decode_loop(engine, embeds, tokens, "pipelined") for _ in range(3))


@torch.inference_mode()
def verify_ratios(engine: Engine, embeds, step_ms: float) -> dict:
    """ms of chained verifies and tree verifies on `engine`, and each over its decode step."""
    prefill(engine, embeds)
    base = engine.length
    out = {}

    def timed(fn) -> float:
        def once():
            engine.rollback(base)
            fn()

        return d7.sync_time(once, REPEATS) * 1e3

    for k in CHAINS:
        block = torch.zeros(1, k, dtype=torch.long, device=engine.device)
        t = timed(lambda block=block: verify(engine, block))
        out[f"chain_{k}"] = {"ms": round(t, 3), "vs_decode": round(t / step_ms, 3)}
    rng = random.Random(0)
    for nodes in h7.TREE_NODES:
        tree = h7.forced_tree(nodes, min(h7.KEEP_PATH, nodes), h7.VOCAB, rng)
        t = timed(lambda tree=tree: verify_tree(engine, 0, tree))
        # the forward alone, its inputs already on the device: what is left is the host building and copying them
        block, parents = (x.to(engine.device) for x in tree_inputs(0, tree))
        forward = timed(lambda b=block, p=parents: engine.run(b, parents=p))
        out[f"tree_{nodes}"] = {"ms": round(t, 3), "vs_decode": round(t / step_ms, 3), "forward_ms": round(forward, 3)}
    return out


def measure(args, save, start: dict | None = None) -> dict:
    """One machine start's numbers. start: a partial run of this same machine start (`--resume`): the parts it has
    are kept, the others measured (inductor's cache on this machine makes its compiles quick the second time)."""
    target = d7.llama_7b(h7.VOCAB, "video-llava-7b-shape")
    max_len = args.context + args.tokens + 2 * h7.MAX_TREE_NODES
    embeds = torch.randn(1, args.context, d7.LLAMA_7B["hidden_size"], device=d7.DEVICE, dtype=torch.bfloat16) * 0.02
    start = start or {"gpu": torch.cuda.get_device_name() if d7.DEVICE == "cuda" else "cpu (smoke run)",
                      "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "settings": args.settings.split(","), "split_kv_launch": launch(),
                      "gemv_launch": {"pairs": gemv.PAIRS, "block_k": gemv.BLOCK_K, "num_warps": gemv.NUM_WARPS},
                      "vision_encode_ms": d7.vision_ms() if not args.smoke else {}}  # fmt: skip
    if "prefill_ms" not in start:
        plain = Engine(target, max_len)
        start["prefill_ms"] = round(d7.sync_time(lambda: prefill(plain, embeds), REPEATS) * 1e3, 2)
        # q/k/v and gate/up as one matmul each: wider GEMMs for 2,080 rows (that engine's weight copies go with it)
        fused = functools.partial(prefill, Engine(target, max_len, fuse="all"), embeds)
        start["prefill_fused_ms"] = round(d7.sync_time(fused, REPEATS) * 1e3, 2)
        del plain, fused
    start.setdefault("decode_ms", {})
    start.setdefault("compile_s", {})
    # a smoke run leaves compiling out: it checks the script on the CPU in seconds
    settings = {k: SETTINGS[k] for k in args.settings.split(",") if not (args.smoke and SETTINGS[k].get("compile"))}
    settings = settings or {k: v for k, v in SETTINGS.items() if not v.get("compile")}
    engines = {}  # kept: the fastest one's decode step is compiled once, and its blocks compile on first use
    for name, options in settings.items():
        if name in start["decode_ms"]:
            continue
        t = time.perf_counter()
        engines[name] = Engine(target, max_len, compile_blocks=not args.smoke, **options)
        d7.decode_loop(engines[name], embeds, 8, True)
        start["compile_s"][name] = round(time.perf_counter() - t, 1)
        start["decode_ms"][name] = round(decode_ms(engines[name], embeds, args.tokens), 3)
        print(name, start["decode_ms"][name], "ms/token", flush=True)
        save({**start, "note": "partial: stopped before verify and the compiled prefill were timed"})
    best = min(start["decode_ms"], key=start["decode_ms"].get)
    engine = engines.get(best) or Engine(target, max_len, compile_blocks=not args.smoke, **settings[best])
    if "verify" not in start:
        step = decode_ms(engine, embeds, args.tokens)
        # the blocks attend as the setting's decode step does (`Engine(attention=...)`)
        start["verify"] = {"setting": best, "block_attention": engine.attention, "compile_blocks": not args.smoke,
                           "fuse": engine.fuse,
                           "blocks": ", ".join(BLOCKS if engine.block_layer is not None else BLOCKS[:1]),
                           "decode_ms": round(step, 3),
                           **verify_ratios(engine, embeds, step)}  # fmt: skip
        print(start["verify"], flush=True)
        save({**start, "note": "partial: stopped before the compiled prefill was timed"})
    if args.profile_verify and "verify_profile" not in start:  # kernel by kernel, uncaptured: a block beyond a step
        tree = h7.forced_tree(64, h7.KEEP_PATH, h7.VOCAB, random.Random(0))
        start["verify_profile"] = {name: d7.kernel_profile(engine, embeds, block=k)
                                   for name, k in (("decode", 1), ("chain_2", 2), ("chain_16", 16))}  # fmt: skip
        start["verify_profile"]["tree_64"] = d7.kernel_profile(engine, embeds, tree=tree)
        print({k: v["by_family_ms"] for k, v in start["verify_profile"].items()}, flush=True)
        save({**start, "note": "partial: stopped before the compiled prefill was timed"})
    if not args.smoke and "prefill_compiled_layers_ms" not in start:  # through the engine's compiled layer halves
        t = time.perf_counter()
        prefill(engine, embeds)
        start["compile_s"]["prefill"] = round(time.perf_counter() - t, 1)
        ms = round(d7.sync_time(lambda: prefill(engine, embeds), REPEATS) * 1e3, 2)
        start["prefill_compiled_layers_ms"] = ms
        print("prefill", start["prefill_ms"], "ms eager,", ms, "compiled", flush=True)
    return start


def launch() -> dict:
    """The split-KV kernels' launch settings (a start's numbers hold for these)."""
    return {
        "splits": attention.SPLITS,
        "block_n": attention.BLOCK_N,
        "num_warps": attention.NUM_WARPS,
        "block_launch": [list(row) for row in attention.BLOCK_LAUNCH],
    }  # lists: as JSON reads them back


def attended(start: dict) -> str:
    """How a start's verify blocks attended (the first starts, before the split-KV blocks, through SDPA), whether
    their projections were fused, and the setting whose decode step their ratios divide by."""
    verify = start["verify"]
    fused = ", fused" if verify.get("fuse", "none") != "none" else ""
    blocks = f", {verify['blocks']}" if "blocks" in verify else ""
    return f"{verify.get('block_attention', 'sdpa')}{fused}{blocks}; {verify.get('setting', '?')} step"


def series(starts: list[dict]) -> dict:
    """Each number's values over the starts that have it: {"decode_ms": {setting: [..]}, "prefill_ms": {"eager": [..],
    "eager_fused": [..], "compiled": [..]}, "verify_vs_decode" and "verify_ms": {"<block> <attention>": [..]}}."""
    # compiled_whole: the whole forward as one graph (the first starts); compiled: the engine's compiled layer halves
    # (compiled with every size symbolic in the starts before they took automatic dynamic shapes)
    fills = {"eager": "prefill_ms", "eager_fused": "prefill_fused_ms", "compiled_whole": "prefill_compiled_ms",
             "compiled_all_symbolic": "prefill_compiled_layers_all_symbolic_ms",
             "compiled": "prefill_compiled_layers_ms"}  # fmt: skip
    # each block by how it attends ("tree_64 split")
    blocks = [{f"{k} {attended(s)}": v for k, v in s["verify"].items() if isinstance(v, dict)}
              for s in starts if "verify" in s]  # fmt: skip
    names = dict.fromkeys(k for b in blocks for k in b)
    return {
        "decode_ms": {k: [s["decode_ms"][k] for s in starts if k in s["decode_ms"]]
                      for k in dict.fromkeys(k for s in starts for k in s["decode_ms"])},
        "prefill_ms": {n: v for n, key in fills.items() if (v := [s[key] for s in starts if key in s])},
        "verify_vs_decode": {k: [b[k]["vs_decode"] for b in blocks if k in b] for k in names},
        "verify_ms": {k: [b[k]["ms"] for b in blocks if k in b] for k in names},
    }  # fmt: skip


def summarize(starts: list[dict]) -> dict:
    """Median and range over the starts of each number, and the goals against the medians."""

    def spread(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values),
                "starts": len(values)}  # fmt: skip

    values = series(starts)
    out = {"prefill_ms": {k: spread(v) for k, v in values["prefill_ms"].items()},  # by path: eager, fused, compiled
           "decode_ms": {k: spread(v) for k, v in values["decode_ms"].items()},
           "verify_vs_decode": {k: spread(v) for k, v in values["verify_vs_decode"].items()}}  # fmt: skip

    def best(rows: dict) -> str:
        """The name with the lowest median, among those over enough starts to count where there are any."""
        enough = [k for k, r in rows.items() if r["starts"] >= MIN_STARTS]
        return min(enough or rows, key=lambda k: rows[k]["median"])

    step = best(out["decode_ms"])
    rows = {"decode_ms": out["decode_ms"][step], "prefill_ms": out["prefill_ms"][best(out["prefill_ms"])]}
    # the tree in steps of the setting that holds the decode goal: a slower step makes any block look cheap
    trees = {
        k: r for k, r in out["verify_vs_decode"].items() if k.startswith("tree_64 ") and k.endswith(f"; {step} step")
    }
    if trees:
        rows["tree_64_vs_decode"] = trees[best(trees)]
    # met only where the median is over enough starts: one start's number is not a result
    out["goals"] = {name: {"goal": GOALS[name], "median": r["median"], "starts": r["starts"],
                           "met": r["median"] <= GOALS[name] and r["starts"] >= MIN_STARTS}
                    for name, r in rows.items()}  # fmt: skip
    return out


def plot(result: dict, path: Path) -> Path:
    """Every start's numbers (dots) and their median (bar) beside the goals: decode per setting, prefill, and
    verify blocks over a decode step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specalign.fsutil import save_png

    starts = result["starts"]
    values = series(starts)
    fig, axes = plt.subplots(1, 3, figsize=(22, 5.4), gridspec_kw={"width_ratios": [5.5, 2.6, 4]})
    for ax, title, rows, goal in (
        (axes[0], "decode, ms/token", values["decode_ms"], GOALS["decode_ms"]),
        (axes[1], "prefill of the prompt, ms", values["prefill_ms"], GOALS["prefill_ms"]),
    ):
        for x, ys in enumerate(rows.values()):
            median = statistics.median(ys)
            ax.bar(x, median, color="#8da0cb", width=0.6)
            ax.scatter([x] * len(ys), ys, color="black", s=14, zorder=3)
            ax.text(x, median, f"{median:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(goal, color="#d62728", linestyle="--", linewidth=1, label=f"goal {goal}")
        labels = [f"{k.replace('_', ' ').replace(' ', chr(10))}\n({len(ys)})" for k, ys in rows.items()]
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylim(0, 1.3 * max(max(ys) for ys in rows.values()))  # room for the legend above the bars
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title, fontsize=10)
    # verify in ms (a ratio also moves with its start's decode step): a line per way the blocks attended, over the
    # block sizes; median, and the range over starts
    ax, verify = axes[2], values["verify_ms"]
    blocks = list(dict.fromkeys(k.split(" ", 1)[0] for k in verify))
    steps = {}  # each way's decode steps (ms), the unit of its starts' ratios
    for s in starts:
        if "verify" in s:
            steps.setdefault(attended(s), []).append(s["verify"]["decode_ms"])
    kinds = list(dict.fromkeys(k.split(" ", 1)[1] for k in verify))
    for i, kind in enumerate(kinds):
        xs = [x for x, b in enumerate(blocks) if f"{b} {kind}" in verify]
        ys = [verify[f"{blocks[x]} {kind}"] for x in xs]
        # a colour each (more lines than the default cycle has), the latest engine's drawn bold
        line = ax.plot(xs, [statistics.median(y) for y in ys], marker="o", markersize=4, color=plt.cm.tab20(i % 20),
                       linewidth=2.5 if kind == kinds[-1] else 1.2,
                       label=f"{kind}: {len(steps[kind])} start{'s' * (len(steps[kind]) > 1)}, "
                             f"step {'/'.join(f'{ms:.2f}' for ms in steps[kind])} ms")[0]  # fmt: skip
        ax.vlines(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), linewidth=2, alpha=0.5)
    step = summarize(starts)["goals"]["decode_ms"]["median"]
    goal = GOALS["tree_64_vs_decode"]
    ax.axhline(
        goal * step,
        color="#d62728",
        linestyle="--",
        linewidth=1,
        label=f"goal for the 64-node tree: {goal} x the decode median {step:.2f} = {goal * step:.2f} ms",
    )
    ax.set_xticks(range(len(blocks)), [b.replace("_", " ") for b in blocks], fontsize=8)
    ax.set_ylabel("ms", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)  # beside the panel: the lines stay visible
    ax.set_title("verify of a chain or tree (ms; each line with its starts' decode steps)", fontsize=10)
    fig.suptitle(f"Target engine at Video-LLaVA-7B shape, {result['setup']['context']}-token context, batch 1, "
                 f"bf16: bars the median over the machine starts (how many in brackets), dots each start "
                 f"({starts[-1]['gpu']})", fontsize=10)  # fmt: skip
    fig.tight_layout()
    return save_png(fig, path)


def plot_profile(result: dict, path: Path) -> Path | None:
    """Where the GPU time of the last profiled start's decode step and verify blocks goes, by kernel family
    (`--profile-verify`: uncaptured kernels, each counted once), beside each one's time through its CUDA graph and
    the memory floor of a step. None when no start was profiled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specalign.fsutil import save_png

    index, start = next(((i, s) for i, s in reversed(list(enumerate(result["starts"], 1))) if "verify_profile" in s),
                        (None, None))  # fmt: skip
    if start is None:
        return None
    profile, verify = start["verify_profile"], start["verify"]
    measured = {"decode": verify["decode_ms"], "chain_2": verify["chain_2"]["ms"],
                "chain_16": verify["chain_16"]["ms"], "tree_64": verify["tree_64"].get("forward_ms")}  # fmt: skip
    families = ["matmul (gemm/gemv)", "attention", "fused / element-wise", "other"]
    colours = dict(zip(families, ("#8da0cb", "#fc8d62", "#66c2a5", "#bbbbbb"), strict=True))
    fig, ax = plt.subplots(figsize=(11, 4))
    for y, (name, row) in enumerate(profile.items()):
        left = 0.0
        for f in families:
            ms = row["by_family_ms"].get(f, 0.0)
            ax.barh(y, ms, left=left, color=colours[f], label=f if y == 0 else None)
            left += ms
        wall = measured.get(name)
        through = "the forward alone" if name == "tree_64" else "through its CUDA graph"
        ax.text(left + 0.05, y, f"kernels {left:.2f} ms" + (f"; {wall:.2f} ms {through}" if wall else ""),
                va="center", fontsize=9)  # fmt: skip
    ax.axvline(
        d7.FLOOR_MS, color="black", linestyle=":", linewidth=1, label=f"a step's memory floor ≈ {d7.FLOOR_MS} ms"
    )
    ax.set_yticks(range(len(profile)), [k.replace("_", " of ").replace("decode", "decode step") for k in profile])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.55 * max(sum(r["by_family_ms"].values()) for r in profile.values()))
    ax.set_xlabel("GPU time by kernel family, ms (the profiler runs each forward without its CUDA graph)")
    ax.set_title(f"Where a step's time goes: start {index}, {verify['setting']}, Video-LLaVA-7B shape, "
                 f"{result['setup']['context']}-token context ({start['gpu']})", fontsize=10)  # fmt: skip
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5, fontsize=8)  # below: the bars' texts stay clear
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=2080)
    p.add_argument("--tokens", type=int, default=100, help="decode steps per timed loop")
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "engine_floor.json"))
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"engine settings to time, of {', '.join(SETTINGS)}")
    p.add_argument(
        "--profile-verify",
        action="store_true",
        help="also profile the best setting's decode step and verify blocks, kernel by kernel",
    )
    p.add_argument("--resume", action="store_true",
                   help="continue the result's last start, stopped partway, on the same machine start")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, times nothing")
    p.add_argument("--plot-only", action="store_true", help="redraw the result's picture and summary, measure nothing")
    args = p.parse_args()
    if args.plot_only:  # and the summary: its rules may have changed since the last start
        result = read_json(args.result)
        result["summary"] = summarize(result["starts"])
        write_json(args.result, result)
        print(plot(result, Path(args.result).with_suffix(".png")))
        print(plot_profile(result, Path(args.result).with_name(Path(args.result).stem + "_profile.png")))
        return
    if unknown := set(args.settings.split(",")) - set(SETTINGS):
        p.error(f"--settings: unknown {', '.join(sorted(unknown))}")
    if args.smoke:
        d7.DEVICE = h7.d7.DEVICE = "cpu"
        d7.LLAMA_7B.update(d7.SMOKE_SHAPE)
        global REPEATS
        REPEATS = 2
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/engine_floor.py: needs a CUDA GPU (or --smoke)")
    # every engine's compiled steps share one code object (`Engine._step`): room for all settings' graphs
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    result = read_json(args.result) if Path(args.result).is_file() else {}
    result.setdefault("benchmark", "engine_floor")
    result["setup"] = {"shape": "Llama-7B LM of Video-LLaVA-7B (vocab 32064), random weights", "dtype": "bf16",
                       "batch": 1, "context": args.context, "tokens_per_loop": args.tokens,
                       "settings": SETTINGS, "goals": GOALS}  # fmt: skip
    starts = result.setdefault("starts", [])
    resumed = None
    if args.resume:
        last = starts[-1] if starts else {}
        if not str(last.get("note", "")).startswith("partial"):
            sys.exit(f"{args.result}: --resume: its last start is complete (or there is none): nothing to resume")
        ran = {"settings": last.get("settings"), "split_kv_launch": last.get("split_kv_launch")}
        if ran != {"settings": args.settings.split(","), "split_kv_launch": launch()}:
            sys.exit(f"{args.result}: --resume: its last start ran other settings ({ran}): run it without --resume")
        resumed = {k: v for k, v in starts.pop().items() if k != "note"}

    def save(start: dict) -> None:  # this start so far after the other starts: a run stopped later keeps it
        result["starts"] = [*starts, start]
        result["summary"] = summarize(result["starts"])
        write_json(args.result, result)

    save(measure(args, save, resumed))
    plot(result, Path(args.result).with_suffix(".png"))
    plot_profile(result, Path(args.result).with_name(Path(args.result).stem + "_profile.png"))
    print(result["summary"]["goals"], flush=True)


if __name__ == "__main__":
    main()
