"""Draft sources for `speculative_decode`: where proposed tokens come from.

Every source has `start(stats)` (called once per prompt, after the target's prefill) and
`propose(accepted, gamma, stats) -> Proposal`, where `accepted` is the answer so far in target token ids
(the target's accepted prefix: a source resyncs on it every round). Feature-level draft heads fit the same
two calls.

- `VLMDraft`: the draft VLM on its own visual input, continuing from the target's accepted prefix;
- `AdaptedDraft`: a `VLMDraft` whose proposals go through the TokenAdapter (the reference study's idea);
- `FixedDraft`: proposes from a fixed token list (an oracle, a wrong draft, or a recorded trace replayed).
"""

from __future__ import annotations

import torch

from specalign.decode.engine import Engine, prefill, verify
from specalign.decode.speculative import Clock, Proposal, Stats
from specalign.errors import SpecalignError
from specalign.models.base import Sampling, probabilities, sample_token


def check_same_tokenizer(draft_vlm, target_vlm) -> None:
    """Proposals are token ids: the draft must speak the target's vocabulary, or every id means something else."""
    a, b = draft_vlm.tokenizer.get_vocab(), target_vlm.tokenizer.get_vocab()
    if a != b:
        only = len(set(a.items()) ^ set(b.items()))
        raise SpecalignError(f"draft {draft_vlm.name} and target {target_vlm.name} have different tokenizers "
                             f"({len(a)} vs {len(b)} tokens, {only} entries differ): their token ids cannot be "
                             "compared; use a draft with the target's tokenizer")  # fmt: skip


class VLMDraft:
    """The draft model drafting on its own prompt (e.g. the event image), resynced on the accepted prefix."""

    name = "draft-vlm"

    def __init__(self, engine: Engine, embeds: torch.Tensor, sampling: Sampling | None = None, generator=None,
                 min_confidence: float = 0.0):  # fmt: skip
        """embeds [1, T, D]: the draft's prompt. min_confidence > 0: adaptive gamma, drafting stops early when
        the draft's probability of its own next token falls below it."""
        self.engine, self.embeds = engine, embeds
        self.sampling, self.generator = sampling or Sampling(), generator
        self.min_confidence = min_confidence

    def start(self, stats: Stats) -> None:
        with Clock(self.engine.device, stats.seconds, "draft"):
            self.logits = prefill(self.engine, self.embeds)  # [1, V]: after the last fed token
        self.prompt_len = self.engine.length
        self.fed: list[int] = []  # answer tokens in the draft's cache

    def _feed(self, tokens: list[int]) -> None:
        if tokens:
            self.logits = verify(self.engine, torch.tensor([tokens], device=self.engine.device))[:, -1]
            self.fed += tokens

    def draft(self, accepted: list[int], gamma: int, stats: Stats) -> tuple[list[int], list[torch.Tensor]]:
        """Resync on `accepted`, then draft up to gamma tokens -> (tokens, their distributions [V] each)."""
        with Clock(self.engine.device, stats.seconds, "draft"):
            same = 0
            while same < min(len(self.fed), len(accepted)) and self.fed[same] == accepted[same]:
                same += 1
            if same < len(self.fed):  # drop the rejected drafts (and anything after them)
                same = min(same, len(accepted) - 1)  # re-feed at least one token: its logits are needed
                self.engine.rollback(self.prompt_len + same)
                self.fed = self.fed[:same]
            self._feed(accepted[same:])
            tokens, dists = [], []
            for i in range(gamma):
                q = probabilities(self.logits[0], self.sampling) if not self.sampling.greedy else None
                tok = int(sample_token(self.logits, self.sampling, self.generator)[0])
                conf = q[tok] if q is not None else torch.softmax(self.logits[0].float(), -1)[tok]
                if tokens and self.min_confidence > 0 and float(conf) < self.min_confidence:
                    break
                tokens.append(tok)
                dists.append(q)
                if i < gamma - 1:
                    self._feed([tok])
        return tokens, dists

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        tokens, dists = self.draft(accepted, gamma, stats)
        return Proposal(tokens, None if self.sampling.greedy else torch.stack(dists))


class AdaptedDraft:
    """The draft VLM's proposals mapped through a TokenAdapter: adapter(draft tokens)[i] predicts target token
    i + 1, so the proposal for answer position j reads the adapter at j - 1 over accepted + drafted tokens."""

    name = "draft-vlm+adapter"

    def __init__(self, inner: VLMDraft, adapter, sampling: Sampling | None = None, generator=None):
        self.inner, self.adapter = inner, adapter
        self.sampling, self.generator = sampling or Sampling(), generator
        self.device = next(adapter.parameters()).device

    def start(self, stats: Stats) -> None:
        self.inner.start(stats)

    @torch.inference_mode()
    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        drafted, _ = self.inner.draft(accepted, gamma, stats)
        with Clock(self.device, stats.seconds, "adapt"):
            seq = (accepted + drafted)[-self.adapter.config.max_positions :]
            logits = self.adapter(torch.tensor([seq], device=self.device)).float()[0]
            start = len(seq) - len(drafted) - 1  # adapter position predicting answer position n
            rows = logits[start : start + len(drafted)]
            q = probabilities(rows, self.sampling) if not self.sampling.greedy else None
            tokens = sample_token(rows, self.sampling, self.generator).tolist()
        return Proposal(tokens, q)


class FixedDraft:
    """Proposes `tokens[len(accepted) : len(accepted) + gamma]` (nothing past the end): with the target's own
    output it is always right; with any other list, as right as that list is."""

    name = "fixed"

    def __init__(self, tokens: list[int]):
        self.tokens = list(tokens)

    def start(self, stats: Stats) -> None:
        pass

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        n = len(accepted)
        tokens = self.tokens[n : n + gamma]
        return Proposal(tokens)  # may be empty: the round is then a plain target step
