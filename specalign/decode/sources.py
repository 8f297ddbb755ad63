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

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def start(self, stats: Stats) -> None:
        with Clock(self.engine.device, stats.seconds, "draft", stats.sync):
            self.logits = prefill(self.engine, self.embeds)  # [1, V]: after the last fed token
        self.prompt_len = self.engine.length
        self.fed: list[int] = []  # answer tokens in the draft's cache

    def predraft(self, k: int, stats: Stats) -> Proposal:
        """start() + k tokens drafted from the prompt alone (while the target prefills)."""
        self.start(stats)
        tokens, _ = self.draft([], k, stats)
        return Proposal(tokens)

    def _feed(self, tokens: list[int]) -> None:
        if tokens:
            self.logits = verify(self.engine, torch.tensor([tokens], device=self.engine.device))[:, -1]
            self.fed += tokens

    def draft(self, accepted: list[int], gamma: int, stats: Stats) -> tuple[list[int], list[torch.Tensor]]:
        """Resync on `accepted`, then draft up to gamma tokens -> (tokens, their distributions [V] each)."""
        with Clock(self.engine.device, stats.seconds, "draft", stats.sync):
            same = 0
            while same < min(len(self.fed), len(accepted)) and self.fed[same] == accepted[same]:
                same += 1
            if same < len(self.fed):  # drop the rejected drafts (and anything after them)
                same = max(0, min(same, len(accepted) - 1))  # re-feed at least one token: its logits are needed
                self.engine.rollback(self.prompt_len + same)
                self.fed = self.fed[:same]
            self._feed(accepted[same:])
            tokens, dists = [], []
            for i in range(gamma):
                q = probabilities(self.logits[0], self.sampling) if not self.sampling.greedy else None
                tok = sample_token(self.logits, self.sampling, self.generator)  # [1], on the device
                conf = None
                if tokens and self.min_confidence > 0:  # adaptive gamma: the only user of the confidence
                    conf = q[tok[0]] if q is not None else torch.softmax(self.logits[0].float(), -1)[tok[0]]
                if i < gamma - 1:  # queued before the token is read on the host (see target_generate)
                    self.logits = verify(self.engine, tok.reshape(1, 1))[:, -1]
                    self.fed.append(int(tok[0]))
                if conf is not None and float(conf) < self.min_confidence:
                    break  # the token may sit fed in the cache: the next round's resync keeps or drops it
                tokens.append(int(tok[0]))
                dists.append(q)
        return tokens, dists

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        tokens, dists = self.draft(accepted, gamma, stats)
        return Proposal(tokens, None if self.sampling.greedy else torch.stack(dists))


class AdaptedDraft:
    """The draft VLM's tokens mapped through a TokenAdapter (the reference study's idea).

    The adapter was trained on independent generations: adapter(draft answer)[i] predicts target answer token
    i + 1. So by default (resync=False) the draft writes its whole answer once, from its own prompt, and the
    proposals for answer positions n..n+gamma-1 are the adapter's predictions at n-1..n+gamma-2: no draft work
    per round. resync=True instead maps the draft's per-round proposals, read over accepted + drafted tokens.
    """

    name = "draft-vlm+adapter"

    def __init__(self, inner: VLMDraft, adapter, sampling: Sampling | None = None, generator=None,
                 resync: bool = False, max_new_tokens: int = 50):  # fmt: skip
        self.inner, self.adapter, self.resync = inner, adapter, resync
        self.sampling, self.generator = sampling or Sampling(), generator
        self.max_new_tokens = max_new_tokens
        self.device = next(adapter.parameters()).device

    def _map(self, seq: list[int], first: int, count: int, stats: Stats):
        """Adapter rows [first, first + count) over seq -> (tokens, distributions [count, V] or None)."""
        with Clock(self.device, stats.seconds, "adapt", stats.sync), torch.inference_mode():
            logits = self.adapter(torch.tensor([seq], device=self.device)).float()[0, first : first + count]
            q = probabilities(logits, self.sampling) if not self.sampling.greedy else None
            return sample_token(logits, self.sampling, self.generator).tolist(), q

    def start(self, stats: Stats) -> None:
        self.inner.start(stats)
        if not self.resync:  # the draft's own answer, then the adapter's guesses at every position, once
            answer, _ = self.inner.draft([], self.max_new_tokens, stats)
            eos = self.inner.engine.vlm.eos_token_id
            answer = answer[: answer.index(eos) + 1] if eos in answer else answer
            answer = answer[: self.adapter.config.max_positions]
            self.guesses, self.q = self._map(answer, 0, len(answer), stats)

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        if not self.resync:
            n = len(accepted)
            tokens = self.guesses[n - 1 : n - 1 + gamma]
            q = self.q[n - 1 : n - 1 + len(tokens)] if self.q is not None else None
            return Proposal(tokens, q)
        drafted, _ = self.inner.draft(accepted, gamma, stats)
        seq = (accepted + drafted)[-self.adapter.config.max_positions :]
        # adapter row len(seq) - len(drafted) - 1 predicts the first proposed position
        tokens, q = self._map(seq, len(seq) - len(drafted) - 1, len(drafted), stats)
        return Proposal(tokens, q)


class FixedDraft:
    """Proposes `tokens[len(accepted) : len(accepted) + gamma]` (nothing past the end): with the target's own
    output it is always right; with any other list, as right as that list is."""

    name = "fixed"

    def __init__(self, tokens: list[int]):
        self.tokens = list(tokens)

    device = torch.device("cpu")

    def start(self, stats: Stats) -> None:
        pass

    def predraft(self, k: int, stats: Stats) -> Proposal:
        return Proposal(self.tokens[:k])

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        n = len(accepted)
        tokens = self.tokens[n : n + gamma]
        return Proposal(tokens)  # may be empty: the round is then a plain target step
