"""Draft sources that read the target's own features: an EAGLE head (chains and EAGLE-2 dynamic trees) and the
feature-adapter cascade.

    target = Engine(vlm, max_len, features=head.feature_layers)    # the target keeps the features a head reads
    head_engine = Engine(head, max_len=...)                          # the head: one Llama layer on the same engine
    source = HeadDraft(head_engine, target, prompt_ids, start, tree=TreeShape(10, 6, 60))  # start: visual_positions_end

The head's sequence is the target's text after its visual block (HiViS: the target's features there already fused
the image): pair i is (the target's feature at position i, the token at i + 1), and the head's output after it is
its guess of the feature at i + 1, whose LM-head logits (the target's frozen head) predict the token at i + 2.
Every round the source feeds the pairs the target just accepted (its verify forward keeps their features in
`target.features`), then drafts from its own outputs: a chain of gamma tokens, or a tree. Tree drafting (EAGLE-2):
each depth expands the top-k nodes by cumulative log-probability, each into its top-k children, all in one head
forward where every node sees the head's context and its own ancestors; at the end the best `nodes` candidates form
the tree (a path's score only falls, and ties go to the shallower node, so the kept set is connected). The whole
tree is drafted on the device; the host reads it once, to build the proposal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specalign.decode.engine import Engine, _fill
from specalign.decode.sources import DraftSource, VLMDraft
from specalign.decode.speculative import Clock, Proposal, Stats
from specalign.errors import SpecalignError
from specalign.models.base import Sampling, probabilities, sample_token

TREE_LIMIT = 256  # nodes one verify may hold: the tree mask is [nodes + 1, cache] per forward


@dataclass(frozen=True)
class TreeShape:
    """A fixed tree envelope: each depth expands `topk` nodes into `topk` children each, `depth` levels, and the
    best `nodes` candidates are verified (fixed shapes: the head's and the target's steps replay as CUDA graphs)."""

    topk: int
    depth: int
    nodes: int

    def __post_init__(self):
        for name in ("topk", "depth", "nodes"):
            if getattr(self, name) < 1:
                raise SpecalignError(f"--tree: {name} must be at least 1, got {getattr(self, name)}")
        if self.nodes > TREE_LIMIT:
            raise SpecalignError(f"--tree: {self.nodes} nodes is more than the {TREE_LIMIT} one verify may hold")
        most = self.topk + (self.depth - 1) * self.topk**2
        if self.nodes > most:
            raise SpecalignError(f"--tree {self}: top-k {self.topk} and depth {self.depth} make at most {most} "
                                 f"candidates, fewer than {self.nodes} nodes")  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """'TOPK,DEPTH,NODES', e.g. '10,6,60' (EAGLE-2's 7B setting)."""
        parts = str(text).split(",")
        try:
            topk, depth, nodes = (int(x) for x in parts)
        except ValueError:
            raise SpecalignError(f"--tree: expected TOPK,DEPTH,NODES (three whole numbers, e.g. 10,6,60), "
                                 f"got {text!r}") from None  # fmt: skip
        return cls(topk, depth, nodes)

    def __str__(self) -> str:
        return f"{self.topk},{self.depth},{self.nodes}"

    def slots(self) -> int:
        """Head cache slots one round's expansions take beyond its context."""
        return (self.depth - 1) * self.topk


def head_feature_layers(head, n_layers: int) -> tuple[int, ...]:
    """The target layers a head reads (`Engine(features=...)`): the final normed state, or EAGLE-3's low, middle
    and high decoder-layer outputs for a `fused` head (the layers `extract --hidden-layers` stored)."""
    from specalign.align.features import fused_layers

    return tuple(fused_layers(n_layers)) if head.head_config.fused else (n_layers,)


class HeadDraft(DraftSource):
    """An EAGLE head drafting from the target's features: chains (any sampling) or dynamic trees (greedy)."""

    name = "eagle-head"

    def __init__(self, head: Engine, target: Engine, prompt_ids: list[int], start: int,
                 context: torch.Tensor | None = None, tree: TreeShape | None = None,
                 sampling: Sampling | None = None, generator=None):  # fmt: skip
        """head: an Engine over an `align.heads.DraftHead` with features=(1,) (its own output: the next feature);
        target: the target's Engine with the head's feature layers; prompt_ids: the target's prompt [T]; start: the
        first position of the head's sequence (`align.features.visual_positions_end`); context: the per-prompt
        context of an eagle+events head (event tokens [1, N, E])."""
        if not target.feature_layers:
            raise SpecalignError("HeadDraft: the target's engine keeps no features (Engine(..., features=...))")
        self.head, self.target, self.tree = head, target, tree
        self.prompt_next = list(prompt_ids[start + 1 :])  # the token after each prompt position of the sequence
        self.first, self.context = start, context
        self.sampling, self.generator = sampling or Sampling(), generator
        if tree is not None and self.head.max_len < len(prompt_ids) - start + 64 + tree.slots():
            raise SpecalignError(f"--tree {tree}: the head's cache of {self.head.max_len} slots is too small for "
                                 f"this prompt's {len(prompt_ids) - start} text tokens and the tree")  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.head.device

    def start(self, stats: Stats) -> None:
        """Once the target's prefill is queued: its features over the prompt wait for the first token (a view, no
        kernel: the target's next forward makes a new features tensor, so this one stays as it is)."""
        self.pending = self.target.features[:, self.first :]  # [1, r, F]
        self.seen = 0
        if self.context is not None:
            if self.head.context is None or self.head.context.shape != self.context.shape:
                self.head.context = self.context.to(self.head.device, self.head.dtype).clone()
            else:  # in place: captured graphs read this buffer
                self.head.context.copy_(self.context)

    def _feed(self, accepted: list[int]) -> None:
        """Pair the target's features of the tokens accepted since the last round with the tokens after them, and
        run the head over the pairs: self.logits [1, V] and self.hidden [1, F] after the last."""
        new = accepted[self.seen :]
        dev = self.head.device
        if self.seen == 0:  # the prompt's pairs and the first answer token, then any verified round's: a prefill
            feats = self.pending
            if len(new) > 1:  # a first round drafted by another source (the hybrid): the verify's accepted rows
                feats = torch.cat([feats, self.target.features[:, : len(new) - 1]], dim=1)
            tokens = torch.tensor([self.prompt_next + new], device=dev)
            x = self.head.embed(tokens, feats.to(dev, self.head.dtype))
            self.logits = _fill(self.head, x, torch.ones_like(tokens, dtype=torch.bool), 0)
        else:
            self.head.rollback(self.context_len)  # drop the last round's drafted nodes
            rows = self.target.features[:, : len(new)].to(dev, self.head.dtype)
            self.logits = self.head.run(torch.tensor([new], device=dev), inputs=rows)[:, -1]
        self.hidden = self.head.features[:, -1]
        self.context_len = self.head.length
        self.seen = len(accepted)

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        with Clock(self.head.device, stats.seconds, "draft", stats.sync):
            self._feed(accepted)
            if self.tree is not None and self.sampling.greedy:
                return self._tree(min(gamma, self.tree.depth))
            return self._chain(gamma)

    def _chain(self, gamma: int) -> Proposal:
        tokens, dists = [], []
        logits, hidden = self.logits, self.hidden
        for i in range(gamma):
            q = probabilities(logits[0], self.sampling) if not self.sampling.greedy else None
            tok = sample_token(logits, self.sampling, self.generator)  # [1], stays on the device
            tokens.append(tok)
            dists.append(q)
            if i < gamma - 1:
                logits = self.head.run(tok.reshape(1, 1), inputs=hidden[:, None])[:, -1]
                hidden = self.head.features[:, -1]
        ids = torch.cat(tokens).tolist()
        return Proposal(ids, None if self.sampling.greedy else torch.stack(dists))

    def _tree(self, depth: int) -> Proposal:
        """EAGLE-2 over `depth` levels -> a tree of at most `nodes` nodes."""
        k, head, dev = self.tree.topk, self.head, self.head.device
        logp = torch.log_softmax(self.logits[0].float(), dim=-1)
        score, token = logp.topk(k)  # depth-1 candidates, [k]
        scores, tokens = [score], [token]
        parents = [torch.full((k,), -1, dtype=torch.long, device=dev)]
        depths = [torch.ones(k, dtype=torch.long, device=dev)]
        frontier = torch.arange(k, device=dev)  # candidate indices expanded next
        front_score, front_token = score, token
        front_hidden = self.hidden.expand(k, -1)  # the feature each frontier node's pair starts from
        # which head slots each frontier node sees: the context, its expanded ancestors and (set below) itself
        sees = torch.zeros(k, head.max_len, dtype=torch.bool, device=dev)
        sees[:, : self.context_len] = True
        base = head.count.clone()  # the context's length in positions
        seen = k
        for d in range(1, depth):
            slots = head.length + torch.arange(k, device=dev)
            sees[torch.arange(k, device=dev), slots] = True
            logits = head.run(front_token[None], inputs=front_hidden[None], positions=(base + d - 1).expand(1, k),
                              attend=sees[None])[0]  # [k, V]  # fmt: skip
            hidden = head.features[0]  # [k, F]
            child_logp, child_token = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)  # [k, k]
            child_score = (front_score[:, None] + child_logp).flatten()  # [k * k]
            scores.append(child_score)
            tokens.append(child_token.flatten())
            parents.append(frontier.repeat_interleave(k))
            depths.append(torch.full((k * k,), d + 1, device=dev))
            best = child_score.topk(k).indices  # the next frontier, among these children
            row = best // k  # its parent's row in this depth's block
            frontier = seen + best
            front_score, front_token = child_score[best], child_token.flatten()[best]
            front_hidden, sees = hidden[row], sees[row]
            seen += k * k
        scores, tokens = torch.cat(scores), torch.cat(tokens)
        parents, depths = torch.cat(parents), torch.cat(depths)
        # a child never outscores its parent; the depth penalty breaks exact ties (probability 1) toward the parent
        keep = (scores - 1e-6 * depths).topk(min(self.tree.nodes, len(scores))).indices
        keep = keep[torch.argsort(depths[keep] * len(scores) + torch.arange(len(keep), device=dev), stable=True)]
        keep_l, tokens_l, parents_l = torch.stack([keep, tokens[keep], parents[keep]]).tolist()  # one host read
        index = {c: i for i, c in enumerate(keep_l)}
        return Proposal(tokens_l, parents=[-1 if p < 0 else index[p] for p in parents_l])


class HybridDraft(DraftSource):
    """The study's hybrid schedule: the event draft drafts while the target encodes and prefills (its tokens are
    verified in the first round, for free when they are right), and a head on the target's features drafts every
    round after; when the target's first token is not the one the event draft guessed, the head drafts round 1 too.
    Without prefill hiding the event draft simply drafts the first round."""

    name = "hybrid: draft-vlm, then eagle-head"

    def __init__(self, first: VLMDraft, then: HeadDraft):
        self.first, self.then = first, then
        self.predrafted = False

    @property
    def device(self) -> torch.device:
        return self.first.device

    def start(self, stats: Stats) -> None:
        self.first.start(stats)
        self.then.start(stats)

    def predraft(self, k: int, stats: Stats) -> Proposal:
        proposal = self.first.predraft(k, stats)
        self.then.start(stats)  # the target's prefill is queued before this: its features tensor exists
        self.predrafted = True
        return proposal

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        # the first round (only the target's prefill token known) is the event draft's, unless it already had its
        # chance in the prefill's shadow and missed the first token: drafting again would cost a draft-VLM step per
        # token where the head costs a few percent of one
        if len(accepted) == 1 and not self.predrafted:
            return self.first.propose(accepted, gamma, stats)
        return self.then.propose(accepted, gamma, stats)


class CascadeDraft(VLMDraft):
    """The feature-adapter cascade: the draft VLM reads its event image and the accepted prefix; its final state
    goes through the adapter into the target's feature space and through the target's LM head; the chosen token is
    fed back to the draft VLM. (The study's feature-level alignment, scored by tokens the target accepts.)"""

    name = "draft-vlm+feature-adapter"

    def __init__(self, engine: Engine, embeds: torch.Tensor, adapter, sampling: Sampling | None = None,
                 generator=None):  # fmt: skip
        """engine: the draft's Engine with features=(its n_layers,); adapter: an `align.heads.FeatureAdapter`
        attached to the target (its `lm_head`)."""
        if not engine.feature_layers:
            raise SpecalignError("CascadeDraft: the draft's engine keeps no features (Engine(..., features=...))")
        super().__init__(engine, embeds, sampling, generator)
        self.adapter = adapter

    @torch.inference_mode()
    def next_logits(self, logits: torch.Tensor) -> torch.Tensor:
        feature = self.engine.features[:, -1].to(self.adapter.dtype)  # [1, Dd]
        return self.adapter.lm_head(self.adapter(feature)).float()
