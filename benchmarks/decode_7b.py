"""Benchmark: the decode engine at 7B shape on one GPU. Random weights: right timing, no meaning.

Target: the Video-LLaVA-7B language model (Llama-7B, vocab 32,064) after a 2,080-token prompt (8 frames x 257
tokens + text); draft: the EventGPT-7B language model (Llama-7B, vocab 32,000) after a 620-token prompt
(577 event tokens + text); bf16, batch 1. Measures:
- target-alone decode ms/token on our engine (CUDA graphs; with the per-token host read a real loop does, and
  without), eager, with --compile the compiled step (and the compiled step over fused q/k/v and gate/up
  matmuls), and HF `generate` (DynamicCache) for comparison; goal <= 4.5 ms/token;
- prefill time; vision encode time (CLIP ViT-L/14 on 8 frames at 224, and ViT-L/14-336 on one event image);
- verify cost of k = 1..16 tokens relative to one decode step;
- with --profile: one decode step's GPU time by kernel family and its top kernels (eager, and compiled);
- a projection of end-to-end SD speedup: the acceptance traces `benchmarks/speculate_mini.py` measured on
  minidsec (per answer: tokens drafted and accepted each round) replayed through these 7B-shaped engines.
Writes benchmarks/results/decode_7b.json.

    python benchmarks/decode_7b.py [--traces /tmp/speculate_runs] [--compile] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specalign.decode.engine import Engine, decode_one_token, prefill, verify  # noqa: E402
from specalign.decode.speculative import verify_tree  # noqa: E402
from specalign.fsutil import write_json  # noqa: E402
from specalign.models.base import VLM  # noqa: E402

DEVICE = "cuda"
# a 7B decode step's memory floor at 2.1k context: 13.2 GB of bf16 weights + 1.1 GB of KV cache at ~4.3 TB/s
FLOOR_MS = 3.7
# --variants: compiled decode steps -> (result row, fuse, tune, fp32_head). Fused: q/k/v and gate/up as one matmul
# each; tuned: inductor's coordinate-descent tuning (which also swaps cuBLAS GEMVs for tuned Triton reductions);
# fp32 head: what `speculate`'s default fp32 LM head costs at this shape
VARIANTS = {"plain": ("engine_compiled_cuda_graphs", "none", "none", False),
            "fused": ("engine_compiled_fused_cuda_graphs", "all", "none", False),
            "tuned": ("engine_compiled_tuned_cuda_graphs", "none", "coordinate", False),
            "fused_tuned": ("engine_compiled_fused_tuned_cuda_graphs", "all", "coordinate", False),
            "tuned_fp32_head": ("engine_compiled_tuned_fp32_head_cuda_graphs", "none", "coordinate", True)}  # fmt: skip


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip


# --smoke: tiny shapes on the CPU (every 7B-shape script's smoke run)
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)  # fmt: skip


def llama_7b(vocab: int, name: str) -> VLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **LLAMA_7B)).eval()
    torch.set_default_dtype(torch.float32)
    return VLM(model=model, tokenizer=None, name=name)


def sync_time(fn, repeat: int = 5) -> float:
    """Median wall seconds of fn() over `repeat` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_loop(engine: Engine, embeds, n: int, host_read: bool | str) -> float:
    """ms/token of n greedy decode steps after a prefill. host_read: True reads each token on the host before the
    next step (a naive loop), "pipelined" after queuing the next step (what target_generate does), False never."""
    logits = prefill(engine, embeds)
    token = logits.argmax(-1)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        nxt = decode_one_token(engine, token).argmax(-1)
        if host_read == "pipelined":
            int(token[0])  # the step that made it is done; the one just queued runs meanwhile
        token = nxt
        if host_read is True:
            int(token[0])
    sync()
    return (time.perf_counter() - t) / n * 1e3


def kernel_profile(engine: Engine, embeds, n: int = 10, top: int = 12, block: int = 1, tree=None) -> dict:
    """Where one decode step's GPU time goes: torch.profiler over n eager (uncaptured) steps -> ms per step by
    kernel family, and the top kernels. A CUDA graph replays the same kernels without the launch gaps.
    block > 1: a verify of that many tokens after the prompt instead (the engine's block step); tree (a
    `Proposal`): a verify of that tree and its root (`verify_tree`)."""
    from torch.profiler import ProfilerActivity, profile

    graphs, engine.graphs = engine.graphs, False
    token = prefill(engine, embeds).argmax(-1)
    base, tokens = engine.length, torch.zeros(1, block, dtype=torch.long, device=engine.device)

    def step(token):
        if block == 1 and tree is None:
            return decode_one_token(engine, token).argmax(-1)
        engine.rollback(base)
        if tree is not None:
            return verify_tree(engine, 0, tree)[-1:].argmax(-1)
        return verify(engine, tokens)[:, -1].argmax(-1)

    for _ in range(3):  # warm-up (and the compile, for a compiled step)
        token = step(token)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            token = step(token)
        sync()
    engine.graphs = graphs
    from torch.autograd import DeviceType

    attr = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    # on a GPU the kernels and copies themselves: a CPU row (an aten op, or the launcher inductor names after its
    # Triton kernel) carries its kernels' time again
    rows = DeviceType.CUDA if DEVICE == "cuda" else DeviceType.CPU
    kernels = [(e.key, getattr(e, attr) / 1e3 / n) for e in prof.key_averages()
               if e.device_type == rows and getattr(e, attr) > 0]  # fmt: skip
    families = {  # attention first: cuDNN's SDPA kernel names contain "wmma", which the matmul keys would take
        "attention": ("flash", "attention", "sdpa", "fmha", "softmax", "split_kv", "merge_kernel"),
        "matmul (gemm/gemv)": ("gemm", "gemv", "sm90", "cutlass", "ampere", "matmul", "mm"),
        "fused / element-wise": ("triton", "elementwise", "vectorized", "reduce", "norm", "mul", "add", "cat"),
    }
    by_family: dict = {}
    for k, ms in kernels:
        fam = next((f for f, keys in families.items() if any(w in k.lower() for w in keys)), "other")
        by_family[fam] = by_family.get(fam, 0.0) + ms
    return {
        "ms_per_step": round(sum(ms for _, ms in kernels), 3),
        "by_family_ms": {f: round(ms, 3) for f, ms in sorted(by_family.items(), key=lambda x: -x[1])},
        "top_kernels_ms": [[k[:120], round(ms, 4)] for k, ms in sorted(kernels, key=lambda x: -x[1])[:top]],
    }


def vision_ms() -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    out = {}
    for name, size, images in (("video_llava_8_frames_224", 224, 8), ("eventgpt_1_image_336", 336, 1)):
        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=size, patch_size=14)  # fmt: skip
        with torch.device(DEVICE):
            tower = CLIPVisionModel(cfg).to(torch.bfloat16).eval()
            pixels = torch.randn(images, 3, size, size, dtype=torch.bfloat16)
        with torch.inference_mode():
            out[name] = round(sync_time(lambda t=tower, x=pixels: t(pixel_values=x)) * 1e3, 2)
        del tower
    return out


def replay(target: Engine, t_embeds, draft: Engine, d_embeds, sample: dict, gamma: int, mode: str) -> tuple:
    """Re-time one answer's SD trace at this shape -> (SD seconds, target-alone seconds).

    mode 'resync': each round the draft feeds the target's new tokens, then drafts (gamma - 1 more steps);
    'answer': the draft writes its whole answer first (the adapter maps it; the adapter itself is negligible);
    'hidden': like resync, but the draft's prefill + first gamma + 1 tokens overlap the target's prefill."""
    n_tokens = len(sample["target_tokens"])
    one = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    sync()
    t = time.perf_counter()
    prefill(target, t_embeds)
    for _ in range(n_tokens - 1):
        int(decode_one_token(target, one[0]).argmax(-1)[0])
    sync()
    alone = time.perf_counter() - t

    sync()
    t = time.perf_counter()
    if mode == "hidden" and DEVICE == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        prefill(target, t_embeds)
        with torch.cuda.stream(side):
            prefill(draft, d_embeds)
            for _ in range(gamma):
                int(decode_one_token(draft, one[0]).argmax(-1)[0])
        torch.cuda.current_stream().wait_stream(side)
    elif mode == "hidden":
        prefill(target, t_embeds)
        prefill(draft, d_embeds)
        for _ in range(gamma):
            int(decode_one_token(draft, one[0]).argmax(-1)[0])
    else:
        prefill(target, t_embeds)
        prefill(draft, d_embeds)
    if mode == "answer":
        for _ in range(n_tokens):
            int(decode_one_token(draft, one[0]).argmax(-1)[0])
    base_t, base_d = target.length, draft.length
    emitted = 1
    pre_drafted = mode == "hidden" and sample.get("free_tokens", 0) > 0
    for r, (g, n) in enumerate(zip(sample["drafted_per_round"], sample["accepted_per_round"], strict=True)):
        if mode != "answer" and not (pre_drafted and r == 0):
            verify(draft, one)  # the draft takes in the target's newest token, then drafts
            for _ in range(max(g - 1, 0)):
                int(decode_one_token(draft, one[0]).argmax(-1)[0])
        logits = verify(target, one.expand(1, g + 1))
        int(logits[0, -1].argmax())
        emitted += n + 1
        target.rollback(base_t + emitted - 1)  # both caches keep the accepted prefix only
        if mode != "answer":
            draft.rollback(min(draft.length, base_d + emitted - 1))
    sync()
    return time.perf_counter() - t, alone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=2080)
    p.add_argument("--draft-context", type=int, default=620)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--traces", default=None, help="folder of speculate runs (source*/results.json) to replay")
    p.add_argument("--replay-answers", type=int, default=24)
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "decode_7b.json"))
    p.add_argument("--compile", action="store_true", help="also time the torch.compiled decode step")
    p.add_argument("--profile", action="store_true", help="also break one decode step's GPU time down by kernel")
    p.add_argument(
        "--variants",
        default="plain,fused,tuned,fused_tuned",
        help="with --compile: which compiled steps to time (comma-separated: " + ", ".join(VARIANTS) + ")",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, times nothing")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    partial = Path(args.result).with_suffix(".partial.json")  # a run cut short keeps what it measured here
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        LLAMA_7B.update(SMOKE_SHAPE)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    res = {"benchmark": "decode_7b", "machine": {"gpu": gpu, "torch": torch.__version__},
           "setup": {"weights": "random (timing only)", "dtype": "bf16", "batch": 1, "target_context": args.context,
                     "draft_context": args.draft_context, "shapes": "Llama-7B LMs of Video-LLaVA-7B (vocab 32064) and "
                     "EventGPT-7B (vocab 32000)"}}  # fmt: skip
    res["vision_encode_ms"] = vision_ms() if not args.smoke else {}
    print(json.dumps(res["vision_encode_ms"]), flush=True)

    target = llama_7b(32064, "video-llava-7b-shape")
    max_len = args.context + args.tokens + 40
    engine = Engine(target, max_len)
    embeds = torch.randn(1, args.context, LLAMA_7B["hidden_size"], device=DEVICE, dtype=torch.bfloat16) * 0.02
    res["prefill_ms"] = round(sync_time(lambda: prefill(engine, embeds)) * 1e3, 2)
    decode_loop(engine, embeds, 8, True)  # captures the decode graph
    graph = [decode_loop(engine, embeds, args.tokens, True) for _ in range(3)]
    graph_async = [decode_loop(engine, embeds, args.tokens, False) for _ in range(3)]
    graph_pipelined = [decode_loop(engine, embeds, args.tokens, "pipelined") for _ in range(3)]
    graphs, engine.graphs = engine.graphs, False
    eager = [decode_loop(engine, embeds, 20, True) for _ in range(2)]
    engine.graphs = graphs
    ms = res["decode_ms_per_token"] = {
        "engine_cuda_graphs": round(statistics.median(graph), 3),
        "engine_cuda_graphs_no_host_read": round(statistics.median(graph_async), 3),
        "engine_cuda_graphs_pipelined_host_read": round(statistics.median(graph_pipelined), 3),
        "engine_eager": round(statistics.median(eager), 3),
        "goal": 4.5,
    }
    write_json(partial, res)
    # the decode step through torch.compile, then captured as a CUDA graph (VARIANTS)
    for key in variants if args.compile else []:
        name, fuse, tune, fp32_head = VARIANTS[key]
        c_engine = Engine(target, max_len, compile=True, fuse=fuse, tune=tune, fp32_head=fp32_head)
        t = time.perf_counter()
        decode_loop(c_engine, embeds, 8, True)
        ms.setdefault("compile_seconds", {})[name] = round(time.perf_counter() - t, 1)
        ms[name] = round(statistics.median([decode_loop(c_engine, embeds, args.tokens, True) for _ in range(3)]), 3)
        ms[name + "_pipelined"] = round(statistics.median(
            [decode_loop(c_engine, embeds, args.tokens, "pipelined") for _ in range(3)]), 3)  # fmt: skip
        print(name, ms[name], "ms/token; compiled in", ms["compile_seconds"][name], "s", flush=True)
        if args.profile:
            res["kernel_profile_" + name.removeprefix("engine_").removesuffix("_cuda_graphs")] = kernel_profile(
                c_engine, embeds)  # fmt: skip
        del c_engine
        write_json(partial, res)
    if args.profile:
        res["kernel_profile_eager"] = kernel_profile(engine, embeds)
        print(json.dumps({k: v["by_family_ms"] for k, v in res.items() if k.startswith("kernel_profile")}), flush=True)
    print(json.dumps(res["decode_ms_per_token"]), flush=True)
    try:  # HF generate with a DynamicCache, the reference's path (prefill + 50 tokens minus prefill + 1)

        def gen(n):
            return target.model.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        with torch.inference_mode():
            t1, t51 = sync_time(lambda: gen(1), 2), sync_time(lambda: gen(51), 2)
        res["decode_ms_per_token"]["hf_generate"] = round((t51 - t1) / 50 * 1e3, 3)
    except Exception as e:  # noqa: BLE001 (recorded in the result, not fatal)
        res["decode_ms_per_token"]["hf_generate_error"] = str(e).splitlines()[0][:200]
    print(json.dumps(res["decode_ms_per_token"]), flush=True)

    prefill(engine, embeds)
    base = engine.length
    one = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    verify_ms = {}
    for k in range(1, 17):

        def step(k=k):
            engine.rollback(base)
            verify(engine, one.expand(1, k))

        verify_ms[k] = sync_time(step, 20) * 1e3
    res["verify_ms"] = {k: round(v, 3) for k, v in verify_ms.items()}
    res["verify_cost_vs_decode"] = {k: round(v / verify_ms[1], 3) for k, v in verify_ms.items()}
    print(json.dumps(res["verify_cost_vs_decode"]), flush=True)

    draft = llama_7b(32000, "eventgpt-7b-shape")
    d_engine = Engine(draft, args.draft_context + 120)
    d_embeds = torch.randn(1, args.draft_context, LLAMA_7B["hidden_size"], device=DEVICE, dtype=torch.bfloat16) * 0.02
    res["draft_prefill_ms"] = round(sync_time(lambda: prefill(d_engine, d_embeds)) * 1e3, 2)
    decode_loop(d_engine, d_embeds, 8, True)
    res["draft_decode_ms_per_token"] = round(statistics.median(
        [decode_loop(d_engine, d_embeds, args.tokens, True) for _ in range(3)]), 3)  # fmt: skip
    print(json.dumps({k: res[k] for k in ("prefill_ms", "draft_prefill_ms", "draft_decode_ms_per_token")}))
    write_json(partial, res)

    if args.traces:
        res["projection"] = []
        for f in sorted(Path(args.traces).glob("source*/results.json")):
            run = json.loads(f.read_text())
            c = run["config"]
            mode = "answer" if c.get("token_adapter", c.get("use_token_adapter")) and not c["adapter_resync"] else (
                "hidden" if c["hide_prefill"] else "resync")  # fmt: skip
            samples = run["samples"][: args.replay_answers]
            for eng, emb in ((engine, embeds), (d_engine, d_embeds)):  # capture every verify width before timing
                prefill(eng, emb)
                for k in range(1, c["gamma"] + 2):
                    verify(eng, one.expand(1, k))
                    eng.rollback(emb.shape[1])
            replay(engine, embeds, d_engine, d_embeds, samples[0], c["gamma"], mode)
            sd = alone = 0.0
            for s in samples:
                a, b = replay(engine, embeds, d_engine, d_embeds, s, c["gamma"], mode)
                sd, alone = sd + a, alone + b
            row = {"trace": str(f.parent), "mode": mode, "gamma": c["gamma"], "alpha_minidsec": run["totals"]["alpha"],
                   "tau_minidsec": run["totals"]["tau"], "answers": len(samples),
                   "projected_speedup": round(alone / sd, 3),
                   "label": "projection: minidsec acceptance replayed at 7B shape"}  # fmt: skip
            res["projection"].append(row)
            print(json.dumps(row), flush=True)
            write_json(partial, res)
    write_json(args.result, res)
    partial.unlink(missing_ok=True)
    plot_profile(res, Path(args.result).with_name("decode_7b_profile.png"))


def plot_profile(res: dict, path: Path) -> Path | None:
    """Where one decode step's GPU time goes, by kernel family, for each profiled step (the kernel_profile_* entries
    of a decode_7b result), beside its measured ms/token and the memory floor. None when nothing was profiled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specalign.fsutil import save_png

    names = [k for k in res if k.startswith("kernel_profile_")]
    if not names:
        return None
    families = sorted({f for k in names for f in res[k]["by_family_ms"]},
                      key=lambda f: -max(res[k]["by_family_ms"].get(f, 0) for k in names))  # fmt: skip
    colours = dict(zip(families, ("#8da0cb", "#fc8d62", "#66c2a5", "#e78ac3", "#a6d854"), strict=False))
    measured = res.get("decode_ms_per_token", {})
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(names) + 1.8))
    for y, k in enumerate(names):
        left = 0.0
        for f in families:
            v = res[k]["by_family_ms"].get(f, 0.0)
            ax.barh(y, v, left=left, color=colours.get(f, "grey"), label=f if y == 0 else None)
            left += v
        variant = k.removeprefix("kernel_profile_")
        wall = measured.get("engine_eager" if variant == "eager" else f"engine_{variant}_cuda_graphs")
        text = f"kernels {left:.2f} ms" + (f"; measured {wall:.2f} ms/token" if wall else "")
        if wall and variant != "eager" and left > wall:  # the ungraphed profile of a tuned step: not its real time
            text += "\n(the ungraphed profile: not the graphed step)"
        ax.text(left + 0.1, y, text, va="center", fontsize=9)
    floor = res.get("floor_ms_per_token", FLOOR_MS)
    ax.axvline(floor, color="black", linestyle=":", linewidth=1)
    ax.text(floor, len(names) - 0.4, f" memory floor ≈ {floor} ms", fontsize=9)
    ax.set_yticks(range(len(names)), [k.removeprefix("kernel_profile_").replace("_", " ") for k in names])
    ax.invert_yaxis()
    ax.set_xlim(0, max(sum(res[k]["by_family_ms"].values()) for k in names) * 1.75)
    ax.set_xlabel("GPU time of one decode step by kernel family (ms; the profiler runs the step without CUDA graphs)")
    ax.set_title(f"Target decode step at Video-LLaVA-7B shape, {res['setup']['target_context']}-token context, "
                 f"{res['machine']['gpu']}", fontsize=10)  # fmt: skip
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot-only"]:  # redraw the profile plot of a result file: --plot-only RESULT.json
        from specalign.fsutil import read_json

        result = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).parent / "results" / "decode_7b.json")
        print(plot_profile(read_json(result), result.with_name("decode_7b_profile.png")))
    else:
        main()
