"""Benchmark: feature-level drafting at 7B shape on one GPU. Random weights: right timing, no meaning.

Target: the Video-LLaVA-7B language model (Llama-7B, vocab 32,064) after a 2,080-token prompt (8 frames x 257
tokens + 24 text tokens); head: EAGLE's (fc([feature ; embedding]) -> one Llama-7B decoder layer -> the target's
frozen LM head), on the same static-cache engine; bf16, batch 1, CUDA graphs (no compile). Measures:
- the target's decode ms/token and prefill, for reference, in the same process;
- the head per draft step: a chain step (T = 1), a tree expansion (T = top-k = 10, and 8), its feed of the pairs a
  round accepted (T = 1..7), its prefill over the prompt text; ms, and c = ms / one target decode step; its
  parameters and the bytes it reads per step;
- the target's tree verify of 16/32/64 nodes (+ the root; an ancestor mask, `verify_tree`) against one decode step,
  and `keep()` of an accepted path of 6;
- with --traces: a replay of the acceptance traces `benchmarks/speculate_mini.py` measured on minidsec (its runs'
  source*/results.json): for each run with an eagle head (chain or tree) or the ngram source, each answer's rounds
  go through these engines (the head drafts through the real `HeadDraft` code: its feed, chain steps or tree
  expansions; the target verifies as many nodes as the trace's round did, a tree whose first `accepted` nodes form
  the accepted path, and keeps it), timed end to end against the target alone on the same answer length. Projects
  (a) the decode-phase speedup and (b) the end-to-end answer latency speedup (vision encode + prefill + decode).
  These are projections: 7B timings x acceptance measured on the mini models.
Writes benchmarks/results/heads_7b.json and heads_7b.png (the projected speedups per source).

    python benchmarks/heads_7b.py [--traces /tmp/speculate_runs] [--replay-answers 24] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_7b as d7  # noqa: E402 (llama_7b, sync_time, LLAMA_7B, DEVICE: one place for the 7B setup)

from specalign.align.heads import (  # noqa: E402
    DraftHead,
    HeadConfig,
    attach_target,
    count_parameters,
    read_head_config,
    target_text_config,
)
from specalign.decode.engine import Engine, decode_one_token, prefill, verify  # noqa: E402
from specalign.decode.heads import HeadDraft, TreeShape, head_feature_layers  # noqa: E402
from specalign.decode.speculative import (  # noqa: E402
    Clock,
    Proposal,
    Stats,
    accept_greedy,
    accept_tree,
    target_generate,
    verify_tree,
)
from specalign.errors import SpecalignError, fail, one_line  # noqa: E402
from specalign.fsutil import ensure_dir, save_png, write_json  # noqa: E402

VOCAB = 32064  # Video-LLaVA-7B's language model
VISUAL_TOKENS = 8 * 257  # its 8 frames before the prompt text: the head's sequence starts after them (HiViS)
# benchmarks/results/decode_7b.json on one H200: CLIP ViT-L/14 on 8 frames at 224 (the target's vision encode), and
# EventGPT's ViT-L/14-336 on one event image (what an eagle+events head needs first: the event tokens)
VISION_MS = 11.4
EVENTS_VISION_MS = 12.4
EVENT_TOKENS = 577  # EventGPT-7B's event tokens (24 x 24 patches + CLS; decode_7b's 620-token draft prompt)
TREE_TOPKS = (10, 8)  # tree expansion widths timed (10: EAGLE-2's 7B setting)
TREE_NODES = (16, 32, 64)  # tree verify sizes timed (+ the root)
FEED_PAIRS = range(1, 8)  # head feeds timed: a round accepts 0..6 tokens of a depth-6 tree, + the target's next
KEEP_PATH = 6
MAX_TREE_NODES = 64  # the largest tree the engines' caches are sized for
REPEATS = 20  # timings per single-step measurement (the median is kept); --smoke: 2
CHAIN_STEPS = 20  # back-to-back chain steps per timing of a drafting loop
PROJECTION_LABEL = "projection: 7B timings x acceptance measured on the mini models"


# ---------------------------------------------------------------- building


def head_for(target, kind: str, fused: bool = False) -> DraftHead:
    """A 7B-shaped draft head of `kind` (eagle, eagle+events) for the target VLM: one layer of the target's shape,
    bf16, attached to the target's frozen embeddings and LM head."""
    text = target_text_config(target.model.config.to_dict())
    events = text["hidden_size"] if kind == "eagle+events" else None  # EventGPT-7B's width: the target's
    config = HeadConfig.for_target(kind, text, fused=fused, events_size=events, target={"name": target.name})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(d7.DEVICE):
        head = DraftHead(config).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    attach_target(head, target)
    return head


def head_cache(text_tokens: int, max_new: int) -> int:
    """Head cache slots: the prompt text, an answer, the deepest tree's drafted nodes (as `speculate` sizes it) and
    room for the back-to-back timing loops."""
    return text_tokens + max_new + max(MAX_TREE_NODES * 6, CHAIN_STEPS * max(TREE_TOPKS)) + 64


def bytes_of(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def forced_tree(nodes: int, accepted: int, vocab: int, rng: random.Random) -> Proposal:
    """A random draft tree of `nodes` nodes whose first `accepted` nodes form a chain from the root (the path the
    replay keeps); every other node hangs off the root or an earlier node."""
    parents = [i - 1 for i in range(accepted)] + [rng.randrange(-1, i) for i in range(accepted, nodes)]
    return Proposal([rng.randrange(vocab) for _ in range(nodes)], parents=parents)


def spread(xs: list[float]) -> dict:
    """{median, p10, p90} (linear interpolation between order statistics)."""
    v = sorted(xs)

    def q(p):
        i = p * (len(v) - 1)
        lo = int(i)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (i - lo)

    return {"median": round(statistics.median(v), 3), "p10": round(q(0.1), 3), "p90": round(q(0.9), 3)}


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


# ---------------------------------------------------------------- 1-3: one step at a time


def target_steps(engine: Engine, embeds: torch.Tensor, tokens: int) -> dict:
    """The target alone: prefill, decode ms/token (host read per token, and pipelined as `target_generate` does)
    and one synchronised decode step (the unit every ratio below divides by)."""
    out = {"prefill_ms": ms(d7.sync_time(lambda: prefill(engine, embeds)))}
    d7.decode_loop(engine, embeds, 8, True)  # captures the decode graph
    out["decode_ms_per_token"] = round(statistics.median(d7.decode_loop(engine, embeds, tokens, True)
                                                         for _ in range(3)), 4)  # fmt: skip
    out["decode_ms_per_token_pipelined"] = round(statistics.median(d7.decode_loop(engine, embeds, tokens, "pipelined")
                                                                   for _ in range(3)), 4)  # fmt: skip
    prefill(engine, embeds)
    base = engine.length
    one = torch.zeros(1, dtype=torch.long, device=engine.device)

    def step():
        engine.rollback(base)
        decode_one_token(engine, one)

    out["decode_step_ms"] = ms(d7.sync_time(step, REPEATS))
    return out


@torch.inference_mode()
def head_steps(h_engine: Engine, t_engine: Engine, embeds: torch.Tensor, text_tokens: int, step_ms: float,
               target_bytes: int) -> dict:  # fmt: skip
    """The head per draft step, as CUDA graphs on a GPU (eager on the CPU), after its prefill over the prompt
    text: ms, and c = ms / one target decode step (`step_ms`)."""
    head, dev = h_engine.vlm, h_engine.device
    D = head.head_config.hidden_size
    prompt_ids = [0] * embeds.shape[1]
    prefill(t_engine, embeds)
    draft = HeadDraft(h_engine, t_engine, prompt_ids, len(prompt_ids) - text_tokens)

    def head_prefill():  # what HeadDraft's first round does: the prompt's pairs and the first answer token
        draft.start(Stats())
        draft.propose([0], 1, Stats())

    out = {"prefill_ms": ms(d7.sync_time(head_prefill, REPEATS)), "prefill_pairs": text_tokens}
    base = h_engine.length
    hidden = h_engine.features[:, -1:].clone()  # [1, 1, D]: the head's own last output
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)

    def timed(block):  # one synchronised step from the context
        def fn():
            h_engine.rollback(base)
            block()

        return d7.sync_time(fn, REPEATS) * 1e3

    chain = timed(lambda: h_engine.run(tok, inputs=hidden))
    out["chain_step_ms"] = round(chain, 4)
    out["chain_step_c"] = round(chain / step_ms, 4)

    def loop():  # a chain's drafting: steps back to back, the host never waiting (as HeadDraft._chain runs)
        h_engine.rollback(base)
        for _ in range(CHAIN_STEPS):
            h_engine.run(tok, inputs=hidden)

    out["chain_loop_ms_per_step"] = ms(d7.sync_time(loop) / CHAIN_STEPS)
    if h_engine.graphs is not False:  # the same step without its CUDA graph: what the launches cost
        graphs, h_engine.graphs = h_engine.graphs, False
        out["chain_step_eager_ms"] = round(timed(lambda: h_engine.run(tok, inputs=hidden)), 4)
        h_engine.graphs = graphs
    out["tree_expansion"] = {}
    for k in TREE_TOPKS:  # k frontier nodes, each seeing the context and itself (HeadDraft._tree's call)
        sees = torch.zeros(1, k, h_engine.max_len, dtype=torch.bool, device=dev)
        sees[:, :, :base] = True
        sees[0, torch.arange(k), base + torch.arange(k)] = True
        x, pos = hidden.expand(1, k, D).contiguous(), (h_engine.count + 0).expand(1, k)
        toks = torch.zeros(1, k, dtype=torch.long, device=dev)
        t = timed(lambda toks=toks, x=x, pos=pos, sees=sees: h_engine.run(toks, inputs=x, positions=pos, attend=sees))
        out["tree_expansion"][k] = {"ms": round(t, 4), "c": round(t / step_ms, 4)}
    out["feed"] = {}
    for n in FEED_PAIRS:  # a round's accepted pairs: the target's features and the tokens after them
        x = torch.randn(1, n, t_engine.features.shape[-1], device=dev, dtype=h_engine.dtype)
        toks = torch.zeros(1, n, dtype=torch.long, device=dev)
        t = timed(lambda toks=toks, x=x: h_engine.run(toks, inputs=x))
        out["feed"][n] = {"ms": round(t, 4), "c": round(t / step_ms, 4)}
    own, lm_head = bytes_of(head), head.lm_head.weight.numel() * head.lm_head.weight.element_size()
    kv = 2 * len(h_engine.k) * h_engine.k[0].numel() * h_engine.k[0].element_size()
    out["parameters"] = count_parameters(head)
    out["bytes_per_step"] = {"own_weights": own, "target_lm_head": lm_head, "kv_cache": kv,
                             "total": own + lm_head + kv, "target_decode_step": target_bytes,
                             "ratio_to_target": round((own + lm_head + kv) / target_bytes, 4)}  # fmt: skip
    return out


@torch.inference_mode()
def verify_costs(engine: Engine, embeds: torch.Tensor, step_ms: float, rng: random.Random) -> dict:
    """The target's tree verify of 16/32/64 nodes (+ the root) against one decode step, a causal block of the same
    size for comparison, and keep() of a path of KEEP_PATH."""
    prefill(engine, embeds)
    base = engine.length
    out = {"tree_verify": {}, "keep": {}}
    for nodes in TREE_NODES:
        tree = forced_tree(nodes, min(KEEP_PATH, nodes), VOCAB, rng)
        block = torch.zeros(1, nodes + 1, dtype=torch.long, device=engine.device)

        def tree_verify(tree=tree):
            engine.rollback(base)
            verify_tree(engine, 0, tree)

        def causal(block=block):
            engine.rollback(base)
            verify(engine, block)

        t, c = d7.sync_time(tree_verify, REPEATS) * 1e3, d7.sync_time(causal, REPEATS) * 1e3
        out["tree_verify"][nodes] = {"tokens": nodes + 1, "ms": round(t, 4), "vs_decode_step": round(t / step_ms, 4),
                                     "causal_block_ms": round(c, 4)}  # fmt: skip
    tree = forced_tree(MAX_TREE_NODES, KEEP_PATH, VOCAB, rng)
    rows = torch.arange(KEEP_PATH + 1, device=engine.device)
    times = []
    for _ in range(REPEATS + 1):
        engine.rollback(base)
        verify_tree(engine, 0, tree)
        d7.sync()
        t = time.perf_counter()
        engine.keep(base, rows)
        d7.sync()
        times.append(time.perf_counter() - t)
    k = statistics.median(times[1:]) * 1e3
    out["keep"] = {
        "path": KEEP_PATH,
        "after_nodes": MAX_TREE_NODES,
        "ms": round(k, 4),
        "vs_decode_step": round(k / step_ms, 4),
    }
    return out


# ---------------------------------------------------------------- 4: replaying acceptance traces


def trace_sources(folder: str | Path, answers: int) -> tuple[list[dict], list[dict]]:
    """The runs of a speculate_mini --runs folder this replay covers -> (sources, skipped). A source: {trace, kind
    (ngram, eagle, eagle+events), fused, tree (TreeShape or None), gamma, max_new, samples, alpha, tau, label}.
    Checked here, before any model is built."""
    folder = Path(folder)
    files = sorted(folder.glob("source*/results.json"))
    if not files:
        raise fail(folder, "no source*/results.json here (the --runs folder of benchmarks/speculate_mini.py)")
    sources, skipped = [], []
    for f in files:
        try:
            run = json.loads(f.read_text())
            c, paths, totals = run["config"], run.get("paths") or {}, run["totals"]
            # an answer of one token (EOS first) has no rounds: nothing to replay
            samples = [s for s in run["samples"] if s["accepted_per_round"]][:answers]
            for i, s in enumerate(samples):
                nodes = s.get("nodes_per_round") or s["drafted_per_round"]
                bad = [r for r, (n, k) in enumerate(zip(s["accepted_per_round"], nodes, strict=True)) if n > k]
                if bad:
                    raise ValueError(f"answer {i} round {bad[0]} accepts more tokens than it drafted")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise fail(f, f"not a speculate results.json ({one_line(e)})") from None
        head_dir = paths.get("draft_head") or c.get("draft_head")
        fused = False
        if c.get("ngram"):
            kind = "ngram"
        elif not head_dir:
            skipped.append({"trace": str(f.parent), "why": "drafts with the draft VLM (decode_7b.py replays it)"})
            continue
        else:
            try:
                head = read_head_config(head_dir)
                kind, fused = head.kind, head.fused
            except SpecalignError as e:
                if run.get("draft") is None:  # the feature-adapter cascade loads the draft VLM; heads need none
                    raise fail(f, f"cannot tell its head's kind: {e}") from None
                kind = "feature-adapter"
        if kind == "feature-adapter":
            skipped.append({"trace": str(f.parent), "why": "the feature-adapter cascade drafts with the draft VLM, "
                            "one 7B step per token (decode_7b.py replays that cost)"})  # fmt: skip
            continue
        if not samples:
            skipped.append({"trace": str(f.parent), "why": "no answer with a round to replay"})
            continue
        tree = TreeShape.parse(c["tree"]) if c.get("tree") else None
        name = f"{kind}{' (fused)' if fused else ''}, " + (f"tree {tree}" if tree else f"chain \u03b3={c['gamma']}")
        sources.append({"trace": str(f.parent), "kind": kind, "fused": fused, "tree": tree, "gamma": c["gamma"],
                        "max_new": c.get("max_new_tokens", 50), "samples": samples,
                        "alpha": totals["alpha"], "tau": totals["tau"], "label": name})  # fmt: skip
    names = [s["label"] for s in sources]
    for s in sources:  # two runs of one envelope (e.g. 1 and 10 questions): tell them apart
        if names.count(s["label"]) > 1:
            s["label"] += f" [{Path(s['trace']).name}]"
    return sources, skipped


@torch.inference_mode()
def replay_answer(t_engine: Engine, embeds: torch.Tensor, sample: dict, src: dict, h_engine: Engine | None,
                  text_tokens: int, context: torch.Tensor | None, sd_first: bool,
                  rng: random.Random) -> dict:  # fmt: skip
    """One answer's trace through the 7B-shaped engines -> seconds of the target alone (prefill, decode) and of SD
    (prefill, decode: the head's prefill and drafting, the target's verifies and keeps, each round's host read).

    The head drafts through `HeadDraft` (its guesses, from random weights, are not used); the target verifies as
    many nodes as the trace's round did: a chain, or a random tree whose first `accepted` nodes form the path kept."""
    dev = t_engine.device
    vocab = VOCAB
    n_tokens = len(sample["target_tokens"])
    ids = list(sample.get("sd_tokens") or sample["target_tokens"])
    nodes_per_round = sample.get("nodes_per_round") or sample["drafted_per_round"]
    rounds = list(zip(sample["accepted_per_round"], nodes_per_round, strict=True))
    proposals = [forced_tree(k, n, vocab, rng) if src["tree"] else Proposal([rng.randrange(vocab) for _ in range(k)])
                 for n, k in rounds]  # fmt: skip
    prompt_ids = [0] * embeds.shape[1]
    res = {}

    def alone():
        _, seconds = target_generate(t_engine, embeds, n_tokens, eos=-1)  # exactly the answer's length
        res["alone_prefill"], res["alone_decode"] = seconds["prefill"], seconds["decode"]

    def sd():
        stats = Stats()
        with Clock(dev, stats.seconds, "prefill"):
            logits = prefill(t_engine, embeds)
        d7.sync()
        t0 = time.perf_counter()
        draft = None
        if h_engine is not None:
            draft = HeadDraft(h_engine, t_engine, prompt_ids, len(prompt_ids) - text_tokens, context, src["tree"])
            draft.start(stats)
        prompt_len = t_engine.length
        out = [int(logits.argmax(-1)[0])]
        for (n, _), proposal in zip(rounds, proposals, strict=True):
            g = max(1, min(src["gamma"], src["max_new"] - len(out)))
            if draft is not None:
                draft.propose(out, g, stats)
            with Clock(dev, stats.seconds, "verify"):
                if proposal.parents is None:
                    block = torch.tensor([[out[-1], *proposal.tokens]], device=dev)
                    accept_greedy(proposal.tokens, verify(t_engine, block)[0])  # the host read; the trace decides n
                    t_engine.rollback(prompt_len + len(out) + n)
                else:
                    slot = t_engine.length
                    accept_tree(proposal, verify_tree(t_engine, out[-1], proposal))
                    rows = torch.arange(n + 1, device=dev)
                    t_engine.keep(slot, rows)
                    if t_engine.features is not None:
                        t_engine.features = t_engine.features[:, rows]
            new = ids[len(out) : len(out) + n + 1]
            out += new + [0] * (n + 1 - len(new))
        d7.sync()
        res["sd_prefill"], res["sd_decode"] = stats.seconds["prefill"], time.perf_counter() - t0
        res["sd_draft"], res["sd_verify"] = stats.seconds["draft"], stats.seconds["verify"]

    for side in (sd, alone) if sd_first else (alone, sd):
        side()
    if h_engine is None:  # the ngram draft's host time, measured by speculate (no GPU work; shape-independent)
        res["sd_draft"] = sample.get("seconds", {}).get("draft", 0.0)
        res["sd_decode"] += res["sd_draft"]
    res.update(tokens=n_tokens, rounds=len(rounds))
    return res


@torch.inference_mode()
def warm_up(t_engine: Engine, embeds: torch.Tensor, src: dict, h_engine: Engine | None, text_tokens: int,
            context: torch.Tensor | None, rng: random.Random) -> None:  # fmt: skip
    """Capture every CUDA graph a source's replay needs before it is timed: the target's decode step and each
    verify size of the traces, the head's feed of every accepted count, its chain step and tree expansion."""
    rounds = [r for s in src["samples"] for r in zip(s["accepted_per_round"], s.get("nodes_per_round")
                                                        or s["drafted_per_round"], strict=True)]  # fmt: skip
    feeds = sorted({n + 1 for n, _ in rounds} | {1})
    sizes = sorted({k for _, k in rounds})
    prefill(t_engine, embeds)
    base = t_engine.length
    draft = None
    if h_engine is not None:  # its pending prompt features are the prefill's
        draft = HeadDraft(h_engine, t_engine, [0] * embeds.shape[1], embeds.shape[1] - text_tokens, context,
                          src["tree"])  # fmt: skip
        draft.start(Stats())
    one = torch.zeros(1, dtype=torch.long, device=t_engine.device)
    decode_one_token(t_engine, one)
    t_engine.rollback(base)
    for k in sizes:
        if src["tree"]:
            verify_tree(t_engine, 0, forced_tree(k, 0, VOCAB, rng))
        else:
            verify(t_engine, torch.zeros(1, k + 1, dtype=torch.long, device=t_engine.device))
        t_engine.rollback(base)
    if draft is None:
        return
    # the head's rounds: each feeds T pairs (T = the last round's accepted + 1) and drafts a full round; the
    # target's features to feed come from its largest verify (a shape captured above: T <= nodes + 1)
    if src["tree"]:
        verify_tree(t_engine, 0, forced_tree(max(sizes), 0, VOCAB, rng))
    else:
        verify(t_engine, torch.zeros(1, max(sizes) + 1, dtype=torch.long, device=t_engine.device))
    t_engine.rollback(base)
    stats = Stats()
    out = [0]
    for t in [0, *feeds]:  # 0: the first round (the head's prefill)
        out += [0] * t
        draft.propose(out, src["gamma"], stats)


def replay(sources: list[dict], target, embeds: torch.Tensor, text_tokens: int, max_len: int, vision_ms: float,
           t_engines: dict, h_engines: dict, rng: random.Random, progress: bool = True) -> list[dict]:  # fmt: skip
    """Every source's answers replayed -> one row per source: per-answer and summary projections. t_engines:
    target engines by feature layers, h_engines: head engines by (kind, fused); both reused and filled in."""
    n_layers = len(target.model.model.layers)
    rows = []
    context = torch.randn(1, EVENT_TOKENS, d7.LLAMA_7B["hidden_size"], device=d7.DEVICE, dtype=torch.bfloat16)
    for src in sources:
        h_engine = head = None
        layers = ()
        if src["kind"] != "ngram":
            key = (src["kind"], src["fused"])
            if key not in h_engines:
                head = head_for(target, *key)
                h_engines[key] = Engine(head, head_cache(text_tokens, src["max_new"]), features=(1,))
            h_engine = h_engines[key]
            head = h_engine.vlm
            layers = head_feature_layers(head, n_layers)
        if layers not in t_engines:
            t_engines[layers] = Engine(target, max_len, features=layers)
        t_engine = t_engines[layers]
        ctx = context if src["kind"] == "eagle+events" else None
        t = time.perf_counter()
        warm_up(t_engine, embeds, src, h_engine, text_tokens, ctx, rng)
        warm_s = time.perf_counter() - t
        per = [replay_answer(t_engine, embeds, s, src, h_engine, text_tokens, ctx, i % 2 == 1, rng)
               for i, s in enumerate(src["samples"])]  # fmt: skip
        extra_ms = vision_ms + (EVENTS_VISION_MS if ctx is not None else 0.0)  # the event tokens come first
        decode = [p["alone_decode"] / p["sd_decode"] for p in per]
        e2e = [(vision_ms / 1e3 + p["alone_prefill"] + p["alone_decode"])
               / (extra_ms / 1e3 + p["sd_prefill"] + p["sd_decode"]) for p in per]  # fmt: skip
        rounds = sum(p["rounds"] for p in per)
        row = {
            "source": src["label"], "trace": src["trace"], "kind": src["kind"], "fused": src["fused"],
            "tree": str(src["tree"]) if src["tree"] else None, "gamma": src["gamma"],
            "alpha_minidsec": round(src["alpha"], 4), "tau_minidsec": round(src["tau"], 4),
            "answers": len(per), "mean_tokens": round(statistics.mean(p["tokens"] for p in per), 2),
            "mean_nodes_per_round": round(statistics.mean(k for s in src["samples"] for k in
                                                          (s.get("nodes_per_round") or s["drafted_per_round"])), 2),
            "head_parameters": count_parameters(head) if head is not None else 0,
            "decode_speedup": spread(decode), "e2e_speedup": spread(e2e),
            "decode_speedup_overall": round(sum(p["alone_decode"] for p in per) / sum(p["sd_decode"] for p in per), 3),
            "ms_per_round": {k: round(sum(p[f"sd_{k}"] for p in per) / rounds * 1e3, 4) for k in ("draft", "verify")},
            "target_alone_ms_per_token": round(sum(p["alone_decode"] for p in per)
                                               / sum(p["tokens"] - 1 for p in per) * 1e3, 4),
            "vision_ms": extra_ms, "warm_up_seconds": round(warm_s, 2),
            "per_answer": [{"tokens": p["tokens"], "rounds": p["rounds"], "decode_speedup": round(d, 3),
                            "e2e_speedup": round(e, 3)} for p, d, e in zip(per, decode, e2e, strict=True)],
            "label": PROJECTION_LABEL,
        }  # fmt: skip
        rows.append(row)
        if progress:
            print(json.dumps({k: v for k, v in row.items() if k != "per_answer"}), flush=True)
    return rows


# ---------------------------------------------------------------- the plot


def plot(rows: list[dict], path: Path, machine: str, graphs: bool) -> None:
    """Bars: each source's projected decode-phase and end-to-end speedups (median over answers, p10-p90 whiskers),
    with the 1x line (the target alone) and the issue's goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8.0, 2.0 * len(rows) + 2.5), 5.6))
    width = 0.38
    kinds = (("decode_speedup", "decode phase", "#3b75af", 3.0), ("e2e_speedup", "end to end (vision + prefill + "
             "decode)", "#ef8636", 1.8))  # fmt: skip
    top, goals = 1.0, []
    for j, (key, name, color, goal) in enumerate(kinds):
        xs = [i + (j - 0.5) * width for i in range(len(rows))]
        med = [r[key]["median"] for r in rows]
        lo = [r[key]["median"] - r[key]["p10"] for r in rows]
        hi = [r[key]["p90"] - r[key]["median"] for r in rows]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=4, color=color, label=name + " (median, p10-p90)")
        for x, r in zip(xs, rows, strict=True):
            ax.annotate(f"{r[key]['median']:.2f}x", (x, r[key]["p90"]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        goals.append(ax.axhline(goal, color=color, ls="--", lw=1, label=f"goal {goal:g}x ({name.split(' (')[0]})"))
        top = max(top, goal, *(r[key]["p90"] for r in rows))
    one = ax.axhline(1.0, color="black", lw=1, label="1x: the target alone")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['source']}\n\u03c4 {r['tau_minidsec']:.2f} on minidsec, {r['answers']} answers"
                        for r in rows], fontsize=8)  # fmt: skip
    ax.set_ylabel("projected speedup vs the target alone (x)")
    ax.set_ylim(0, top * 1.15)
    how = "bf16, CUDA graphs" if graphs else "bf16, eager"
    ax.set_title(f"Feature-level drafting at 7B shape ({machine}, {how})\n{PROJECTION_LABEL}", fontsize=10)
    bars = [h for h in ax.get_legend_handles_labels()[0] if h not in goals and h is not one]
    ax.legend(handles=[*bars, one, *goals], fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
              frameon=False)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


# ---------------------------------------------------------------- --smoke


def smoke_traces(folder: Path, rng: random.Random) -> Path:
    """A tiny speculate_mini --runs folder: ngram and eagle chains, eagle and eagle+events (fused) trees, and a
    draft-VLM and a cascade run the replay skips. Acceptance made up; the format is results.json's."""

    def head(kind: str, fused: bool = False) -> str:
        cfg = HeadConfig(kind, 8, 775, 24 if fused else 8, fused=fused, events_size=8 if "events" in kind else None)
        write_json(ensure_dir(folder / f"head_{kind}") / "config.json", cfg.to_json())
        return str(folder / f"head_{kind}")

    runs = [({"ngram": "table.json"}, None, None), ({}, head("eagle"), None), ({}, folder / "head_eagle", "3,3,6"),
            ({}, head("eagle+events", fused=True), "2,3,5"), ({}, None, None), ({}, "adapter", None)]  # fmt: skip
    for i, (extra, head_dir, tree) in enumerate(runs):
        gamma, max_new = (int(tree.split(",")[1]) if tree else 4), 12
        samples = []
        for _ in range(3):
            acc, nodes, out = [], [], 1
            while out < max_new:
                g = min(gamma, max_new - out)
                k = int(tree.split(",")[2]) if tree else rng.randint(0, g) if extra else g
                acc.append(rng.randint(0, min(g, k)))
                nodes.append(k)
                out += acc[-1] + 1
            tokens = [rng.randrange(775) for _ in range(min(out, max_new))]
            samples.append({"target_tokens": tokens, "sd_tokens": tokens, "accepted_per_round": acc,
                            "drafted_per_round": [min(k, gamma) for k in nodes], "nodes_per_round": nodes,
                            "seconds": {"draft": 1e-4 * len(acc)}})  # fmt: skip
        run = {"config": {"gamma": gamma, "tree": tree, "max_new_tokens": max_new, "ngram": extra.get("ngram"),
                          "draft_head": str(head_dir) if head_dir else None},
               "paths": {"draft_head": str(head_dir) if head_dir else None},
               "draft": "mini-draft" if head_dir == "adapter" or not (head_dir or extra) else None,
               "totals": {"alpha": 0.5, "tau": 2.0}, "samples": samples}  # fmt: skip
        write_json(ensure_dir(folder / f"source{i}") / "results.json", run)
    return folder


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=VISUAL_TOKENS + 24, help="the target's prompt: 8 frames + text")
    p.add_argument("--text-tokens", type=int, default=24, help="prompt tokens after the visual block (the head's)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per timing of the target alone")
    p.add_argument("--traces", default=None, help="speculate_mini.py's --runs folder (source*/results.json)")
    p.add_argument("--replay-answers", type=int, default=24, help="answers replayed per source (the first N)")
    p.add_argument("--seed", type=int, default=0, help="the random trees' seed")
    p.add_argument("--result", default=None, help="default benchmarks/results/heads_7b.json (png beside it)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, times nothing")
    args = p.parse_args()
    for name in ("context", "text_tokens", "tokens", "replay_answers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    tmp = None
    if args.smoke:
        global REPEATS
        REPEATS = 2
        d7.DEVICE = "cpu"
        d7.LLAMA_7B.update(d7.SMOKE_SHAPE)
        args.context, args.text_tokens, args.tokens = 40, 8, 8
        tmp = tempfile.TemporaryDirectory(prefix="heads_7b_smoke_")
        args.traces = args.traces or str(smoke_traces(Path(tmp.name) / "runs", rng))
        args.result = args.result or str(Path(tmp.name) / "heads_7b.json")
    if args.text_tokens >= args.context:
        p.error("--text-tokens: must be fewer than --context")
    result = Path(args.result or Path(__file__).parent / "results" / "heads_7b.json")
    try:
        sources, skipped = trace_sources(args.traces, args.replay_answers) if args.traces else ([], [])
    except SpecalignError as e:
        sys.exit(f"error: {e}")
    partial = result.with_suffix(".partial.json")  # a run cut short keeps what it measured here
    machine = torch.cuda.get_device_name() if d7.DEVICE == "cuda" else "cpu (smoke run)"
    max_new = max([s["max_new"] for s in sources] + [50])
    max_len = args.context + max(args.tokens, max_new) + MAX_TREE_NODES + 2 + 64  # as `speculate` sizes it
    res = {"benchmark": "heads_7b", "machine": {"gpu": machine, "torch": torch.__version__},
           "setup": {"weights": "random (timing only)", "dtype": "bf16", "batch": 1, "cuda_graphs": d7.DEVICE == "cuda",
                     "compile": False, "target": f"Llama-7B LM of Video-LLaVA-7B (vocab {VOCAB})",
                     "target_context": args.context, "head_text_tokens": args.text_tokens,
                     "head": "EAGLE: fc([feature ; embedding]) -> one Llama-7B decoder layer -> the target's LM head",
                     "target_cache_slots": max_len, "vision_encode_ms": VISION_MS,
                     "events_vision_encode_ms": EVENTS_VISION_MS, "event_tokens": EVENT_TOKENS,
                     "vision_source": "benchmarks/results/decode_7b.json (one H200)"}}  # fmt: skip
    t_start = time.perf_counter()
    target = d7.llama_7b(VOCAB, "video-llava-7b-shape")
    n_layers = len(target.model.model.layers)
    embeds = torch.randn(1, args.context, d7.LLAMA_7B["hidden_size"], device=d7.DEVICE, dtype=torch.bfloat16) * 0.02
    engine = Engine(target, max_len, features=(n_layers,))  # a head's target keeps its last-layer features
    res["target"] = target_steps(engine, embeds, args.tokens)
    step = res["target"]["decode_step_ms"]
    kv = 2 * len(engine.k) * engine.k[0].numel() * engine.k[0].element_size()
    weights = bytes_of(target.model) - bytes_of(target.model.get_input_embeddings())  # a step gathers one row
    res["target"]["bytes_per_step"] = {"weights": weights, "kv_cache": kv}
    print(json.dumps(res["target"]), flush=True)
    write_json(partial, res)

    head = head_for(target, "eagle")
    h_engine = Engine(head, head_cache(args.text_tokens, max_new), features=(1,))
    res["head"] = head_steps(h_engine, engine, embeds, args.text_tokens, step, weights + kv)
    print(json.dumps(res["head"]), flush=True)
    res["verify"] = verify_costs(engine, embeds, step, rng)
    print(json.dumps(res["verify"]), flush=True)
    write_json(partial, res)

    if sources:
        res["projection"] = replay(
            sources,
            target,
            embeds,
            args.text_tokens,
            max_len,
            VISION_MS,
            {(n_layers,): engine},
            {("eagle", False): h_engine},
            rng,
        )
        res["projection_skipped"] = skipped
        res["projection_note"] = (
            f"{PROJECTION_LABEL}. Each answer of a speculate_mini run (the first {args.replay_answers}) is replayed "
            "round by round through 7B-shaped engines with random weights: the head drafts through HeadDraft (feed "
            "of the pairs the last round accepted, then gamma-1 chain steps or depth-1 tree expansions of top-k "
            "nodes; its prefill over the prompt text runs in the first round), the target verifies as many nodes "
            "as the trace's round did (a chain; or a random tree whose first `accepted` nodes form the path) and "
            "keeps the accepted ones, with each round's host read. Decode-phase speedup = the target alone's decode "
            "time for the answer's length / the replayed SD decode time (head prefill included). End to end = "
            f"(vision {VISION_MS} ms + prefill + target-alone decode) / (vision + prefill + SD decode); an "
            f"eagle+events head also waits for EventGPT's event encode ({EVENTS_VISION_MS} ms, serial, as speculate "
            "runs it now). Prefill is measured per answer in this run; vision encode is decode_7b.json's. The ngram "
            "source drafts on the host: only its verifies run here, plus its host draft time from the trace. "
            "Medians over answers with p10-p90. Acceptance on minidsec's regular answers is higher than on real "
            "Video-LLaVA answers would be; see the ngram row for a text-only reference."
        )
        plot(res["projection"], result.with_suffix(".png"), machine, d7.DEVICE == "cuda")
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(result, res)
    partial.unlink(missing_ok=True)
    print(f"wrote {result}" + (f" and {result.with_suffix('.png')}" if sources else "") + f" ({res['seconds']} s)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
