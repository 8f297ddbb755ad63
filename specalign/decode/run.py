"""`specalign speculate`: speculative decoding over a split and its questions, measured against the target alone.

For every (sample, question): the target alone on the static-cache engine (the baseline of every speedup), HF
`generate` (the reference's path), and SD with the chosen draft source. Writes to --out:
results.json (config, totals, per sample: sd_tokens, target_tokens, alpha, tau, times; top-level `lossless`),
BENCHMARK_RESULTS.md (tables + output examples), timing_breakdown.png, acceptance_histogram.png, speedup.png.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specalign.decode.engine import Engine, prompt_embeds
from specalign.decode.sources import AdaptedDraft, VLMDraft, check_same_tokenizer
from specalign.decode.speculative import Clock, divergence, speculative_decode, target_generate
from specalign.errors import SpecalignError
from specalign.fsutil import atomic_path, ensure_dir, write_bytes, write_json
from specalign.models.base import Sampling
from specalign.options import option

STAGES = ("vision", "prefill", "draft", "adapt", "verify")


@dataclass
class SpeculateConfig:
    dataset: str = option(help="a split folder")
    out: str = option(help="results folder (results.json, BENCHMARK_RESULTS.md, plots)")
    draft: str = option("mini-draft", help="a bundled model name or a checkpoint directory")
    target: str = option("mini-target", help="a bundled model name or a checkpoint directory")
    questions: int = option(1, help="the first N questions of the {question, count} list")
    questions_file: str | None = option(None, help="a {question, count} JSON list (the reference format)")
    max_samples: int | None = option(None, help="use the first N samples of the split (default: all)")
    gamma: int = option(4, help="draft tokens per round")
    min_confidence: float = option(
        0.0, help="adaptive gamma: stop drafting when the draft's probability falls below this (0: off)"
    )
    max_new_tokens: int = option(50, help="tokens to generate per answer")
    token_adapter: str | None = option(
        None,
        help="map the draft's proposals through this TokenAdapter: a best_model/ folder, a task folder, or a folder "
        "of task folders (its `latest` task)",
    )
    adapter_resync: bool = option(
        False, help="map the resynced draft's per-round proposals (default: its own whole answer, as trained)"
    )
    temperature: float = option(0.0, help="0 = greedy; > 0 samples (with --top-p and --seed)")
    top_p: float = option(1.0, help="nucleus sampling mass in (0, 1] (sampling only)")
    seed: int = option(0, help="random seed of the sampling")
    repeats: int = option(3, help="time the target alone and SD this many times per answer (the median is kept)")
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    draft_device: str | None = option(None, help="e.g. cuda:1: the draft on its own GPU (default: --device)")
    target_device: str | None = option(None, help="e.g. cuda:0 (default: --device)")
    hide_prefill: bool = option(False, help="the draft drafts while the target prefills")
    dtype: str | None = option(None, help="bf16 | fp16 | fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    hf_baseline: bool = option(True, help="also time HF generate (the reference's path)")
    # bf16 ties broke greedy SD apart on the H200: a tie may break differently in a verify than in a decode step
    fp32_head: bool = option(
        True,
        help="the target's logits from an fp32 LM head: bf16 logits tie now and then, and a tie may break "
        "differently in a verify than in a decode step on a GPU",
    )
    overwrite: bool = option(False, help="start over: clear the output folder if it holds a run with other settings")


def run_speculate(cfg: SpeculateConfig, progress: bool = True) -> dict:
    from specalign.align.extract import load_questions
    from specalign.data import open_dataset
    from specalign.models import load_model

    if cfg.gamma < 1:
        raise SpecalignError(f"--gamma must be at least 1, got {cfg.gamma}")
    adapter = None
    if cfg.token_adapter:
        from specalign.align.token_adapter import load_adapter

        path = Path(cfg.token_adapter)
        if not path.exists():
            raise SpecalignError(f"{path}: no TokenAdapter checkpoint here (--token-adapter-path)")
        adapter = load_adapter(path).to(cfg.draft_device or cfg.device).eval()
    dataset = open_dataset(cfg.dataset)
    questions = load_questions(dataset, cfg.questions, cfg.questions_file)
    target = load_model(cfg.target, device=cfg.target_device or cfg.device, dtype=cfg.dtype)
    draft = load_model(cfg.draft, device=cfg.draft_device or cfg.device, dtype=cfg.dtype)
    check_same_tokenizer(draft, target)
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed)
    gen = torch.Generator(device=target.device).manual_seed(cfg.seed)
    # the draft samples on its own device (a generator serves one device)
    d_gen = gen if draft.device == target.device else torch.Generator(device=draft.device).manual_seed(cfg.seed + 1)
    eos = target.eos_token_id
    n = len(dataset) if cfg.max_samples is None else min(cfg.max_samples, len(dataset))
    jobs = [(i, q) for i in range(n) for q in questions]
    t_engine = d_engine = None
    rows = []
    for i, q in tqdm(jobs, desc="speculate", unit="answer", disable=not progress):
        sample = dataset[i]
        seconds = {}
        t_prompt, d_prompt = target.prepare(sample, q), draft.prepare(sample, q)
        with Clock(target.device, seconds, "vision"):  # vision encode + splice, both models
            te, _ = prompt_embeds(target, target.collate([t_prompt]))
            de, _ = prompt_embeds(draft, draft.collate([d_prompt]))
        need_t, need_d = te.shape[1] + cfg.max_new_tokens + cfg.gamma + 2, de.shape[1] + cfg.max_new_tokens + 2
        if t_engine is None or t_engine.max_len < need_t:
            t_engine = Engine(target, need_t + 64, fp32_head=cfg.fp32_head)
        if d_engine is None or d_engine.max_len < need_d + cfg.gamma:
            d_engine = Engine(draft, need_d + cfg.gamma + 64)
        if not rows:  # warm-up: CUDA graphs are captured on first use, not inside the timed runs
            target_generate(t_engine, te, 4, eos)
            speculative_decode(t_engine, te, VLMDraft(d_engine, de), cfg.gamma, 4, eos)
        t0 = time.perf_counter()
        ref, ref_seconds = target_generate(t_engine, te, cfg.max_new_tokens, eos, sampling, gen)
        target_s = time.perf_counter() - t0
        source = VLMDraft(d_engine, de, sampling, d_gen, cfg.min_confidence)
        if adapter is not None:
            source = AdaptedDraft(source, adapter, sampling, d_gen, cfg.adapter_resync, cfg.max_new_tokens)
        t0 = time.perf_counter()
        out, stats = speculative_decode(t_engine, te, source, cfg.gamma, cfg.max_new_tokens, eos, sampling, gen,
                                        cfg.hide_prefill)  # fmt: skip
        sd_s = time.perf_counter() - t0
        hf_s = None
        if cfg.hf_baseline:
            t0 = time.perf_counter()
            target.generate([t_prompt], cfg.max_new_tokens, sampling)
            if target.device.type == "cuda":
                torch.cuda.synchronize()
            hf_s = time.perf_counter() - t0
        rows.append({
            "sample": i, "question": q, "sd_tokens": out, "target_tokens": ref, "same": out == ref,
            "divergence": divergence(t_engine, te, ref, out) if out != ref and sampling.greedy else None,
            "alpha": stats.alpha, "tau": stats.tau, "drafted": stats.drafted, "accepted": stats.accepted,
            "rounds": stats.rounds, "free_tokens": stats.free_tokens,
            "first_token_accepted": stats.first_accepted / max(stats.rounds, 1),
            "accepted_per_round": stats.accepted_per_round, "drafted_per_round": stats.drafted_per_round,
            "seconds": {"vision": seconds["vision"], **stats.seconds, "sd_total": sd_s, "target_alone": target_s,
                        "target_alone_prefill": ref_seconds["prefill"], "hf_generate": hf_s},
            "sd_text": target.decode(out), "target_text": target.decode(ref),
        })  # fmt: skip
    result = _summarise(cfg, rows, target, draft)
    _write(Path(cfg.out), result)
    return result


def _summarise(cfg, rows, target, draft) -> dict:
    drafted = sum(r["drafted"] for r in rows)
    accepted = sum(r["accepted"] for r in rows)
    rounds = sum(r["rounds"] for r in rows)
    tokens = sum(len(r["sd_tokens"]) for r in rows)
    sd = sum(r["seconds"]["sd_total"] for r in rows)
    alone = sum(r["seconds"]["target_alone"] for r in rows)
    hf = [r["seconds"]["hf_generate"] for r in rows if r["seconds"]["hf_generate"] is not None]
    lossless = all(r["same"] for r in rows)
    totals = {
        "answers": len(rows), "tokens": tokens, "alpha": accepted / max(drafted, 1),
        "tau": (accepted + rounds) / max(rounds, 1),
        "first_token_acceptance": sum(r["first_token_accepted"] * r["rounds"] for r in rows) / max(rounds, 1),
        "mean_accepted_per_round": accepted / max(rounds, 1),
        "free_tokens_from_prefill_hiding": sum(r["free_tokens"] for r in rows),
        "sd_tokens_per_s": tokens / sd, "target_tokens_per_s": sum(len(r["target_tokens"]) for r in rows) / alone,
        "speedup_vs_target_engine": alone / sd, "speedup_vs_hf_generate": (sum(hf) / sd) if hf else None,
        "median_speedup_vs_target_engine": statistics.median(
            r["seconds"]["target_alone"] / r["seconds"]["sd_total"] for r in rows),
        "stage_seconds": {k: sum(r["seconds"].get(k, 0.0) for r in rows) for k in STAGES},
    }  # fmt: skip
    if cfg.temperature > 0:
        lossless_note = "sampling: SD follows the target's distribution; token identity is not expected"
    else:
        lossless_note = "greedy: SD tokens must equal the target-alone tokens"
    return {
        "config": asdict(cfg),
        "target": target.name,
        "draft": draft.name,
        "device": str(target.device),
        "gpu": torch.cuda.get_device_name() if target.device.type == "cuda" else None,
        "lossless": lossless,
        "lossless_rule": lossless_note,
        # greedy answers that differ: where, and the target's margin there (see decode.speculative.divergence)
        "divergences": [
            {"sample": r["sample"], "question": r["question"], **r["divergence"]} for r in rows if r.get("divergence")
        ],  # fmt: skip
        "totals": totals,
        "samples": rows,
    }


def _write(out: Path, res: dict) -> None:
    ensure_dir(out)
    write_json(out / "results.json", res)
    write_bytes(out / "BENCHMARK_RESULTS.md", _markdown(res).encode())
    _plots(out, res)


def _markdown(res: dict) -> str:
    t, c = res["totals"], res["config"]
    src = "draft VLM (resynced on the accepted prefix)"
    if c["token_adapter"]:
        src = "TokenAdapter over " + (
            "the resynced draft's proposals" if c["adapter_resync"] else "the draft's own answer"
        )
    mode = "greedy" if c["temperature"] <= 0 else f"T={c['temperature']:g} top-p={c['top_p']:g}"
    lines = [
        "# Speculative decoding results", "",
        f"target `{res['target']}`, draft `{res['draft']}`, source: {src}, gamma {c['gamma']}"
        + (f" (adaptive, min confidence {c['min_confidence']})" if c["min_confidence"] > 0 else "")
        + f", {mode}, "
        f"device {res['device']}{' (' + res['gpu'] + ')' if res['gpu'] else ''}", "",
        f"**lossless: {res['lossless']}** ({res['lossless_rule']})", "",
        "| answers | tokens | alpha | tau | first-token acc. | accepted/round | SD tok/s | target tok/s | "
        "speedup vs target engine | vs HF generate |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {t['answers']} | {t['tokens']} | {t['alpha']:.3f} | {t['tau']:.2f} | {t['first_token_acceptance']:.3f} | "
        f"{t['mean_accepted_per_round']:.2f} | {t['sd_tokens_per_s']:.1f} | {t['target_tokens_per_s']:.1f} | "
        f"{t['speedup_vs_target_engine']:.2f}x | "
        + (f"{t['speedup_vs_hf_generate']:.2f}x |" if t["speedup_vs_hf_generate"] else "- |"), "",
        "Time by stage (s, all answers): " + ", ".join(f"{k} {v:.3f}" for k, v in t["stage_seconds"].items())
        + (f"; prefill hiding on: {t['free_tokens_from_prefill_hiding']} tokens accepted from drafts made during "
           "the target's prefill" if c["hide_prefill"] else ""), "",
    ]  # fmt: skip
    if res.get("divergences"):
        lines += ["## Where greedy SD left the target-alone answer", "",
                  "margin = the target's logit of its own token minus that of the SD token at the first difference, "
                  "computed token by token (alone) and in one verify forward (verify); near 0 = a near-tie that "
                  "reduced precision can flip", "",
                  "| sample | question | position | target token | SD token | margin alone | margin verify |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {d['sample']} | {d['question']} | {d['position']} | {d['target_token']} | {d['sd_token']} | "
            f"{d.get('margin_alone', '-')} | {d.get('margin_verify', '-')} |"
            for d in res["divergences"]
        ]
        lines.append("")
    lines += ["## Examples", ""]
    differing = [r for r in res["samples"] if not r["same"]]
    for r in (differing + [r for r in res["samples"] if r["same"]])[:5]:
        lines += [f"**sample {r['sample']}: {r['question']}** (alpha {r['alpha']:.2f}, tau {r['tau']:.2f})", "",
                  f"- SD: {r['sd_text']}", f"- target alone: {r['target_text']}", ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plots(out: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

    stages = res["totals"]["stage_seconds"]
    colours = {"vision": "tab:blue", "prefill": "tab:orange", "draft": "tab:green", "adapt": "tab:red",
               "verify": "tab:purple", "decode": "tab:grey"}  # fmt: skip
    alone_prefill = sum(r["seconds"]["target_alone_prefill"] for r in res["samples"])
    alone = sum(r["seconds"]["target_alone"] for r in res["samples"])
    rows = {"vision encode\n(both models)": {"vision": stages["vision"]},
            "SD": {k: stages[k] for k in ("prefill", "draft", "adapt", "verify")},
            "target alone": {"prefill": alone_prefill, "decode": alone - alone_prefill}}  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 3.6))
    seen = set()
    for label, parts in rows.items():
        left = 0.0
        for k, v in parts.items():
            ax.barh([label], [v], left=left, color=colours[k], label=None if k in seen else k)
            seen.add(k)
            left += v
    ax.invert_yaxis()
    ax.set_xlabel("seconds over all answers (the speedup compares SD with target alone; vision is paid by both)")
    ax.set_title(f"Where the time goes: SD {res['totals']['speedup_vs_target_engine']:.2f}x vs target alone")
    ax.legend(fontsize=8, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    save(fig, "timing_breakdown.png")

    per_round = [n for r in res["samples"] for n in r["accepted_per_round"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    g = res["config"]["gamma"]
    ax.hist(per_round, bins=[x - 0.5 for x in range(g + 2)], rwidth=0.85)
    ax.set_xlabel("draft tokens accepted in a round")
    ax.set_ylabel("rounds")
    ax.set_title(f"Acceptance per round (gamma {g}, alpha {res['totals']['alpha']:.2f})")
    save(fig, "acceptance_histogram.png")

    sp = [r["seconds"]["target_alone"] / r["seconds"]["sd_total"] for r in res["samples"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(sp, bins=20)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("speedup vs target alone (same engine), per answer")
    ax.set_ylabel("answers")
    ax.set_title(f"Speedup: {res['totals']['speedup_vs_target_engine']:.2f}x overall")
    save(fig, "speedup.png")
