"""Lossless speculative decoding: a draft proposes gamma tokens, the target verifies them in one forward.

    tokens, stats = speculative_decode(target, target_embeds, draft, gamma=4, max_new_tokens=50, eos=2)

Greedy: accept the longest prefix of proposals equal to the target's argmax, then emit the target's own next
token (the correction, or the bonus token when all gamma pass): the output is the target's greedy output.
Sampling: the rule of Leviathan et al. 2023 (accept x with probability min(1, p(x)/q(x)); on rejection sample
from norm(max(0, p - q)); after gamma acceptances a bonus token from p), so outputs follow the target's
distribution. Both models' caches roll back to the accepted prefix after every round.

Draft sources (`decode.sources.DraftSource`) share one small interface: `start()`, then `propose(accepted,
gamma)` -> `Proposal` (tokens and, for sampling, the distributions they were drawn from); `predraft(k)` when the
target's prefill is hidden.

A proposal may be a tree (`Proposal.parents`: EAGLE-2's dynamic draft trees): the target verifies every node in one
forward, each node seeing the prefix and its own ancestors (positions = prefix length + depth); the longest path
whose tokens equal the target's argmax is accepted and only its keys and values are kept. Trees are greedy only.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from specalign.decode.engine import Engine, decode_one_token, prefill, verify
from specalign.errors import SpecalignError
from specalign.models.base import Sampling, probabilities, sample_token

if TYPE_CHECKING:
    from specalign.decode.sources import DraftSource


@dataclass
class Proposal:
    tokens: list[int]  # gamma proposed token ids (a tree: its nodes, every parent before its children)
    q: torch.Tensor | None = None  # float32 [gamma, V]: the distribution each was drawn from (None: one-hot)
    parents: list[int] | None = None  # a tree: each node's parent index in `tokens`, -1 for the root's children

    @property
    def depth(self) -> int:
        """The most tokens one round can accept: the chain's length, or the tree's deepest path."""
        if self.parents is None:
            return len(self.tokens)
        return max(tree_depths(self.parents), default=0)


def tree_depths(parents: list[int]) -> list[int]:
    """Each node's depth (1 for the root's children); parents come before their children."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


@dataclass
class Stats:
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # target verify forwards
    first_accepted: int = 0  # rounds whose first proposal was accepted
    accepted_per_round: list[int] = field(default_factory=list)
    drafted_per_round: list[int] = field(default_factory=list)  # a tree's depth: the most it could accept
    nodes_per_round: list[int] = field(default_factory=list)  # tokens verified besides the last accepted one
    seconds: dict = field(default_factory=lambda: {"prefill": 0.0, "draft": 0.0, "adapt": 0.0, "verify": 0.0})
    free_tokens: int = 0  # tokens accepted from drafts made while the target was still prefilling
    prefill_hit: bool = False  # the draft's guess of the target's first token was right: round 1 was pre-drafted
    sync: bool = True  # False while the draft overlaps the target's prefill: clocks must not wait on the GPU

    @property
    def alpha(self) -> float:
        """Accepted / drafted tokens."""
        return self.accepted / max(self.drafted, 1)

    @property
    def tau(self) -> float:
        """Tokens emitted per target verify forward, bonus or correction token included."""
        return (self.accepted + self.rounds) / max(self.rounds, 1)


class Clock:
    """Wall time of a section; synchronizes CUDA so the time lands in the right section (sync=False: it does
    not, for work that overlaps other work on purpose)."""

    def __init__(self, device: torch.device, seconds: dict, key: str, sync: bool = True):
        self.device, self.seconds, self.key = device, seconds, key
        self.sync = sync and device.type == "cuda"

    def __enter__(self):
        if self.sync:
            torch.cuda.synchronize(self.device)
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        if self.sync:
            torch.cuda.synchronize(self.device)
        self.seconds[self.key] = self.seconds.get(self.key, 0.0) + time.perf_counter() - self.t


def accept_greedy(proposal: list[int], logits: torch.Tensor) -> tuple[int, int]:
    """logits [g + 1, V] of the target after the last accepted token and each proposal -> (accepted count n,
    the target's token at position n)."""
    best = logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(proposal) and proposal[n] == best[n]:
        n += 1
    return n, best[n]


def accept_sampling(proposal: Proposal, logits: torch.Tensor, sampling: Sampling, generator=None) -> tuple[int, int]:
    """Leviathan et al.'s rule over logits [g + 1, V] -> (accepted count n, the next token)."""
    p = probabilities(logits, sampling)  # [g + 1, V]
    g = len(proposal.tokens)
    if proposal.q is None:  # a deterministic draft: q is one-hot on its token
        q = torch.zeros_like(p[:g])
        q[torch.arange(g), torch.tensor(proposal.tokens, dtype=torch.long)] = 1.0  # long: an empty proposal too
    else:  # a draft may propose fewer ids than the target has (the shared vocabulary): zeros above
        q = proposal.q.to(p.device, p.dtype)[:, : p.shape[-1]]
        q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))
    u = torch.rand(g, generator=generator, device=generator.device if generator is not None else "cpu")
    for i, x in enumerate(proposal.tokens):
        if u[i].item() * q[i, x].item() < p[i, x].item():  # u < p/q without dividing by a zero q
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if residual.sum() <= 0:  # p == q: any token of p is right
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return g, int(torch.multinomial(p[g], 1, generator=generator))


def accept_tree(proposal: Proposal, logits: torch.Tensor) -> tuple[list[int], int]:
    """logits [1 + nodes, V] of the target after the last accepted token (row 0) and after each node -> (the
    accepted path as node indices, root first, and the target's token after it)."""
    best = logits.argmax(dim=-1).tolist()
    children: dict[int, list[int]] = {}
    for i, p in enumerate(proposal.parents):
        children.setdefault(p, []).append(i)
    path, node = [], -1
    while True:
        nxt = best[node + 1]
        child = next((c for c in children.get(node, ()) if proposal.tokens[c] == nxt), None)
        if child is None:
            return path, nxt
        path.append(child)
        node = child


def verify_tree(target: Engine, last: int, proposal: Proposal) -> torch.Tensor:
    """One forward over the last accepted token and every tree node -> logits [1 + nodes, V]. Node i (block row
    i + 1) sees the prefix, the last token and its own ancestors, at position prefix + its depth."""
    tokens, parents = tree_inputs(last, proposal)
    return target.run(tokens, parents=parents)[0]


def tree_inputs(last: int, proposal: Proposal) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify_tree`'s block, on the host: tokens long [1, T] (the last token, then the nodes) and each one's parent
    row in the block, long [1, T] (-1 for the last token, the root). `Engine.run` copies them into its graph's
    inputs without waiting for the GPU, and makes the tree's mask and positions there (`attention.ancestors`)."""
    host = torch.tensor([[last, *proposal.tokens], [-1, *(p + 1 for p in proposal.parents)]])
    return host[:1], host[1:]


@torch.inference_mode()
def target_generate(target: Engine, embeds: torch.Tensor, max_new_tokens: int, eos: int,
                    sampling: Sampling | None = None, generator=None) -> tuple[list[int], dict]:  # fmt: skip
    """The baseline: the target alone on the same engine, one token per forward. embeds [1, T, D]."""
    sampling = sampling or Sampling()
    seconds = {"prefill": 0.0, "decode": 0.0}
    with Clock(target.device, seconds, "prefill"):
        logits = prefill(target, embeds)
    out = []
    with Clock(target.device, seconds, "decode"):
        token = sample_token(logits, sampling, generator)  # [1], on the device
        while True:
            # queue the next step before reading this token: the host then waits for the step that made it while
            # the GPU already runs the next one (reading first leaves the GPU idle during every launch); after
            # EOS one queued step is wasted
            more = len(out) + 1 < max_new_tokens
            if more:
                logits = decode_one_token(target, token)
            out.append(int(token[0]))
            if out[-1] == eos or not more:
                break
            token = sample_token(logits, sampling, generator)
    return out, seconds


@torch.inference_mode()
def divergence(target: Engine, embeds: torch.Tensor, ref: list[int], out: list[int]) -> dict | None:
    """Where a greedy SD answer `out` first leaves the target-alone answer `ref`, and how close the target's
    choice was there (None when they are equal). The target's logits at that position are computed twice: token by
    token as the target alone does, and in one verify forward over the shared prefix as SD does. margin =
    logit(ref token) - logit(SD token): a few hundredths on a path means a near-tie, where reduced precision (bf16
    kernels that differ between one and k rows) can flip the argmax without any logic error. embeds [1, T, D]."""
    p = next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b), min(len(ref), len(out)))
    if p == len(ref) == len(out):
        return None
    row = {
        "position": p,
        "target_token": ref[p] if p < len(ref) else None,
        "sd_token": out[p] if p < len(out) else None,
    }
    if row["target_token"] is None or row["sd_token"] is None:
        return row  # one answer is a prefix of the other: nothing to compare at p
    prefix = torch.tensor([ref[:p]], device=target.device)
    logits = prefill(target, embeds)[0]
    for t in prefix[0]:
        logits = decode_one_token(target, t.reshape(1))[0]
    paths = {"alone": logits}
    logits = prefill(target, embeds)[0]
    paths["verify"] = verify(target, prefix)[0, -1] if p else logits
    for name, lg in paths.items():
        row[f"margin_{name}"] = round(float(lg[ref[p]] - lg[out[p]]), 5)
    return row


def prefill_hidden(target: Engine, embeds: torch.Tensor, draft: DraftSource, k: int, stats: Stats):
    """The target prefills while the draft prefills and drafts k tokens from the prompt alone (its own CUDA
    stream on a shared GPU; on another device it simply runs while the target's kernels do). Returns (target
    logits [1, V], the k pre-drafted tokens). Timed as one 'prefill' section: the draft's part is hidden in it."""
    side = None
    if target.device.type == "cuda" and draft.device == target.device:
        side = torch.cuda.Stream(target.device)
        side.wait_stream(torch.cuda.current_stream(target.device))
    with Clock(target.device, stats.seconds, "prefill"):
        logits = prefill(target, embeds)  # on a GPU this only queues the kernels
        stats.sync = False
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            drafted = draft.predraft(k, stats)
        stats.sync = True
        if side is not None:
            torch.cuda.current_stream(target.device).wait_stream(side)
    return logits, drafted


@torch.inference_mode()
def speculative_decode(target: Engine, embeds: torch.Tensor, draft: DraftSource, gamma: int, max_new_tokens: int,
                       eos: int, sampling: Sampling | None = None, generator=None, hide_prefill: bool = False,
                       prefill_draft: int | None = None) -> tuple[list[int], Stats]:  # fmt: skip
    """Generate up to max_new_tokens for one prompt (embeds [1, T, D]) with the target verifying `draft`'s
    proposals. Returns (tokens, Stats). The first token comes from the target's prefill.

    hide_prefill: the draft drafts `prefill_draft` tokens (default gamma + 1) while the target prefills; when the
    target's first token equals the first of them, the others (up to gamma) are verified at once: tokens for free,
    in the prefill's shadow. Fewer than gamma + 1 fit a draft whose steps would outlast the prefill."""
    if gamma < 1:
        raise SpecalignError(f"gamma must be at least 1, got {gamma}")
    sampling = sampling or Sampling()
    stats = Stats()
    pre = None
    if hide_prefill:
        logits, pre = prefill_hidden(target, embeds, draft, prefill_draft or gamma + 1, stats)
    else:
        with Clock(target.device, stats.seconds, "prefill"):
            logits = prefill(target, embeds)
        draft.start(stats)
    prompt_len = target.length
    vocab = logits.shape[-1]
    out = [int(sample_token(logits, sampling, generator)[0])]
    while out[-1] != eos and len(out) < max_new_tokens:
        g = min(gamma, max_new_tokens - len(out))
        if pre is not None and sampling.greedy and pre.tokens[:1] == out and len(out) == 1:
            proposal = Proposal(pre.tokens[1 : g + 1])  # drafted during the prefill
        else:
            proposal = draft.propose(out, g, stats)
        if proposal.tokens and not 0 <= min(proposal.tokens) <= max(proposal.tokens) < vocab:
            bad = next(t for t in proposal.tokens if not 0 <= t < vocab)
            raise SpecalignError(f"draft {draft.name} proposed token id {bad}, outside the "
                                 f"target's vocabulary of {vocab}")  # fmt: skip
        with Clock(target.device, stats.seconds, "verify"):
            # the cache holds prompt + out[:-1]: feed the last emitted token and the proposals together
            if proposal.parents is None:
                block = torch.tensor([[out[-1], *proposal.tokens]])  # `Engine.run` copies it without a wait
                logits = verify(target, block)[0]  # [g + 1, V]
                if sampling.greedy:
                    n, nxt = accept_greedy(proposal.tokens, logits)
                else:
                    n, nxt = accept_sampling(proposal, logits, sampling, generator)
                accepted = proposal.tokens[:n]
                target.rollback(prompt_len + len(out) + n)
            else:
                if not sampling.greedy:
                    raise SpecalignError("draft trees are greedy only: sampling needs the multi-draft rejection "
                                         "rule; use a chain (no --tree) with --temperature > 0")  # fmt: skip
                start = target.length
                logits = verify_tree(target, out[-1], proposal)  # [1 + nodes, V]
                path, nxt = accept_tree(proposal, logits)
                n, accepted = len(path), [proposal.tokens[i] for i in path]
                rows = torch.tensor([0, *(i + 1 for i in path)], device=target.device)
                target.keep(start, rows)
                if target.features is not None:  # a head reads the accepted rows in order, as after a chain
                    target.features = target.features[:, rows]
        stats.rounds += 1
        stats.drafted += proposal.depth
        stats.accepted += n
        stats.first_accepted += int(n > 0)
        stats.accepted_per_round.append(n)
        stats.drafted_per_round.append(proposal.depth)
        stats.nodes_per_round.append(len(proposal.tokens))
        if pre is not None and stats.rounds == 1 and pre.tokens[:1] == out:
            stats.free_tokens, stats.prefill_hit = n, True
        pre = None
        new = accepted + [nxt]
        if eos in new:
            new = new[: new.index(eos) + 1]
        out += new
    return out[:max_new_tokens], stats
