"""Draft sources for `speculative_decode`: where proposed tokens come from.

Every source is a `DraftSource`: `start(stats)` (once per prompt, after the target's prefill) and
`propose(accepted, gamma, stats) -> Proposal`, where `accepted` is the answer so far in target token ids
(the target's accepted prefix: a source resyncs on it every round). `predraft(k, stats)` starts the source while
the target prefills and may already propose k tokens from the prompt alone (default: none). Feature-level draft
heads fit the same calls.

- `VLMDraft`: the draft VLM on its own visual input, continuing from the target's accepted prefix;
- `AdaptedDraft`: a `VLMDraft` whose proposals go through the TokenAdapter (the reference study's idea);
- `FixedDraft`: proposes from a fixed token list (an oracle, a wrong draft, or a recorded trace replayed).
"""

from __future__ import annotations

from typing import Protocol

import torch

from specalign.decode.engine import Engine, prefill, verify
from specalign.decode.speculative import Clock, Proposal, Stats
from specalign.errors import SpecalignError
from specalign.models.base import Sampling, probabilities, sample_token


class DraftSource(Protocol):
    """What `speculative_decode` needs of a draft. Sources may subclass it for the default `predraft`."""

    name: str
    device: torch.device  # where it drafts (prefill hiding overlaps it with the target only on the same GPU)

    def start(self, stats: Stats) -> None:
        """Get ready for a new prompt (called after the target's prefill)."""
        ...

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        """Up to gamma target token ids to follow `accepted` (the answer so far)."""
        ...

    def predraft(self, k: int, stats: Stats) -> Proposal:
        """start(), run while the target prefills, plus up to k tokens drafted from the prompt alone (none here)."""
        self.start(stats)
        return Proposal([])


def shared_vocabulary(draft_vlm, target_vlm) -> int:
    """The number of leading token ids the draft may propose to the target: ids 0..n-1 must mean the same token
    in both tokenizers. Checked on the base vocabularies both share (Llama's 32,000 for EventGPT-7B and
    Video-LLaVA-7B-hf), then extended over any further ids that agree; ids above (the draft's own added tokens such
    as `<ev_patch>`, the target's `<image>`, `<video>`, `<pad>`) are never proposed. A real mismatch (two
    different tokenizers) is refused on one line."""
    return shared_ids(draft_vlm.tokenizer, target_vlm.tokenizer, draft_vlm.vocab_size, target_vlm.vocab_size,
                      draft_vlm.name, target_vlm.name)  # fmt: skip


def shared_ids(a, b, a_embeddings: int, b_embeddings: int, a_name: str, b_name: str) -> int:
    """`shared_vocabulary` from the tokenizers and embedding counts alone (no model loaded: the check runs before
    any heavy work, on `models.inspect_model`'s results)."""
    ta, tb = _tokens_by_id(a), _tokens_by_id(b)
    n = min(a.vocab_size, b.vocab_size, len(ta), len(tb))
    differ = [i for i in range(n) if ta[i] != tb[i]]
    if differ:
        i = differ[0]
        raise SpecalignError(
            f"draft {a_name} and target {b_name} have different tokenizers: {len(differ)} of the "
            f"{n} ids both should share differ (first: id {i} is {ta[i]!r} in the draft, {tb[i]!r} in the target); "
            "proposals are token ids, so the draft needs the target's tokenizer"
        )
    while n < min(len(ta), len(tb)) and ta[n] == tb[n] and ta[n] is not None:
        n += 1
    return min(n, a_embeddings, b_embeddings)


def _tokens_by_id(tokenizer) -> list[str | None]:
    """The token of each id 0..len-1 (None for an id no token has)."""
    vocab = tokenizer.get_vocab()
    out: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        out[i] = token
    return out


class VLMDraft(DraftSource):
    """The draft model drafting on its own prompt (e.g. the event image), resynced on the accepted prefix."""

    name = "draft-vlm"

    def __init__(self, engine: Engine, embeds: torch.Tensor, sampling: Sampling | None = None, generator=None,
                 min_confidence: float = 0.0):  # fmt: skip
        """embeds [1, T, D]: the draft's prompt. min_confidence > 0: adaptive gamma, drafting stops early when
        the draft's probability of its own next token falls below it."""
        self.engine, self.embeds = engine, embeds
        self.sampling, self.generator = sampling or Sampling(), generator
        self.min_confidence = min_confidence
        vlm = engine.vlm
        # ids it may propose: those that mean the same token in the target (its own extra ids never)
        self.limit = min(vlm.shared_vocab or vlm.vocab_size, vlm.vocab_size)
        unk = vlm.tokenizer.unk_token_id
        self.stand_in = unk if unk is not None and unk < self.limit else vlm.pad_token_id  # for target-only ids

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def start(self, stats: Stats) -> None:
        with Clock(self.engine.device, stats.seconds, "draft", stats.sync):
            self.logits = self.next_logits(prefill(self.engine, self.embeds))  # [1, V]: after the last fed token
        self.prompt_len = self.engine.length
        self.fed: list[int] = []  # answer tokens in the draft's cache

    def next_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits to draft from after a forward of the draft (its own [1, V]; a cascade maps its features)."""
        return logits

    def predraft(self, k: int, stats: Stats) -> Proposal:
        """start() + k tokens drafted from the prompt alone (while the target prefills)."""
        self.start(stats)
        tokens, _ = self.draft([], k, stats)
        return Proposal(tokens)

    def _feed(self, tokens: list[int]) -> None:
        """Append accepted target tokens to the draft's cache; a target-only id (e.g. `<video>`, which the draft's
        vocabulary lacks or gives another meaning) goes in as the draft's unknown token."""
        if tokens:
            ids = [t if t < self.limit else self.stand_in for t in tokens]
            self.logits = self.next_logits(verify(self.engine, torch.tensor([ids], device=self.engine.device))[:, -1])
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
                logits = self.logits[:, : self.limit]  # [1, limit]: never an id the target reads otherwise
                q = probabilities(logits[0], self.sampling) if not self.sampling.greedy else None
                tok = sample_token(logits, self.sampling, self.generator)  # [1], on the device
                conf = None
                if tokens and self.min_confidence > 0:  # adaptive gamma: the only user of the confidence
                    conf = q[tok[0]] if q is not None else torch.softmax(logits[0].float(), -1)[tok[0]]
                if i < gamma - 1:  # queued before the token is read on the host (see target_generate)
                    self.logits = self.next_logits(verify(self.engine, tok.reshape(1, 1))[:, -1])
                    self.fed.append(int(tok[0]))
                if conf is not None and float(conf) < self.min_confidence:
                    break  # the token may sit fed in the cache: the next round's resync keeps or drops it
                tokens.append(int(tok[0]))
                dists.append(q)
        return tokens, dists

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        tokens, dists = self.draft(accepted, gamma, stats)
        return Proposal(tokens, None if self.sampling.greedy else torch.stack(dists))


class AdaptedDraft(DraftSource):
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
        """Adapter rows [first, first + count) over seq -> (tokens, distributions [count, limit] or None). The
        adapter speaks target ids; like the draft's own, they stay inside the shared vocabulary."""
        with Clock(self.device, stats.seconds, "adapt", stats.sync), torch.inference_mode():
            logits = self.adapter(torch.tensor([seq], device=self.device)).float()[0, first : first + count]
            logits = logits[:, : self.inner.limit]
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


class FixedDraft(DraftSource):
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
