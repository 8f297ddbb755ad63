"""Batched greedy generation for extraction: many questions per sample on the static-cache engine.

    answers = generate_shared(vlm, [[prompt_q0, prompt_q1, ...] for each sample], max_new_tokens=50)

The prompts of one sample differ only after the shared prefix (the visual input and the template before the
question): that prefix is encoded and prefilled once per sample (`SharedPrefixEngine`), and every question's
row attends to it. Tokens stay on the GPU until the batch ends.
"""

from __future__ import annotations

import torch

from specalign.decode.engine import SharedPrefixEngine, decode_one_token, prefill_shared, prompt_embeds
from specalign.models.base import Prompt


def common_prefix(rows: list[torch.Tensor]) -> int:
    """Length of the longest token prefix shared by all rows, long [T_i] each."""
    n = min(len(r) for r in rows)
    first = rows[0][:n]
    for r in rows[1:]:
        diff = (r[:n] != first).nonzero()
        if len(diff):
            n = int(diff[0])
            first = first[:n]
    return n


@torch.inference_mode()
def generate_shared(vlm, groups: list[list[Prompt]], max_new_tokens: int = 50,
                    engines: dict | None = None) -> list[list[list[int]]]:  # fmt: skip
    """groups[s]: the prompts of sample s (one visual input, several questions) -> greedy new tokens per prompt,
    each ending at (and including) EOS like `VLM.generate`. engines: a dict to reuse engines (and their CUDA
    graphs) across calls of the same shape."""
    S, Q = len(groups), max(len(g) for g in groups)
    rows = [p for g in groups for p in g + [g[-1]] * (Q - len(g))]  # short groups repeat a prompt (dropped)
    ids = [p.input_ids for p in rows]
    P = min(common_prefix(ids), min(len(i) for i in ids) - 1)  # every row keeps at least one token of its own
    prefix = vlm.collate([Prompt(g[0].input_ids[:P], g[0].visual, "") for g in groups])
    prefix_embeds, _ = prompt_embeds(vlm, prefix)  # [S, P, D]: one vision encode per sample
    T = max(len(i) - P for i in ids)
    suffix_ids = torch.full((len(rows), T), vlm.pad_token_id, dtype=torch.long)
    pad = torch.ones(len(rows), T, dtype=torch.bool)
    for r, i in enumerate(ids):
        suffix_ids[r, T - (len(i) - P) :] = i[P:]
        pad[r, T - (len(i) - P) :] = False
    vlm.check_tokens(suffix_ids)
    engine_key = (P, S, Q, T + max_new_tokens)
    engines = {} if engines is None else engines
    if engine_key not in engines:
        engines.clear()  # one shape at a time: the KV memory of older shapes is released
        engines[engine_key] = SharedPrefixEngine(vlm, P, S, Q, T + max_new_tokens)
    engine = engines[engine_key]
    suffix = engine.lm.embed_tokens(suffix_ids.to(engine.device))
    logits = prefill_shared(engine, prefix_embeds, suffix, pad)
    out = torch.empty(len(rows), max_new_tokens, dtype=torch.long, device=engine.device)
    eos = vlm.eos_token_id
    n = max_new_tokens
    for i in range(max_new_tokens):
        out[:, i] = logits.argmax(-1)
        if i + 1 == max_new_tokens:
            break
        if i % 8 == 7 and bool((out[:, : i + 1] == eos).any(dim=1).all()):  # a host sync only every 8 steps
            n = i + 1
            break
        logits = decode_one_token(engine, out[:, i])
    tokens = out[:, :n].tolist()
    result = []
    for s, g in enumerate(groups):
        answers = []
        for q in range(len(g)):
            t = tokens[s * Q + q]
            answers.append(t[: t.index(eos) + 1] if eos in t else t)
        result.append(answers)
    return result
