"""One interface for a vision-language model used as draft or target.

A backend turns a dataset sample + question into a `Prompt` (its own template and visual input), and the
shared code here runs the model step by step, the way a speculative decoder needs it:

    prompts = [vlm.prepare(sample, q) for q in questions]
    state, step = vlm.prefill(vlm.collate(prompts))     # visual encode + prompt, logits of the last position
    step = vlm.forward(tokens, state)                    # k new tokens -> logits for each (decode: k=1, verify: k>1)
    vlm.rollback(state, length)                          # drop rejected tokens from the KV cache

Batches are left-padded; positions come from the attention mask, so a padded row computes exactly what it
would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from specalign.errors import SpecalignError

try:  # transformers 5.24 renamed the KV-cache argument past_key_values -> cache; 5.17 knows only the old name
    import inspect

    from transformers import LlamaForCausalLM

    _CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
except ImportError:  # pragma: no cover
    _CACHE_KW = "past_key_values"


@dataclass
class Prompt:
    """One model-ready prompt."""

    input_ids: torch.Tensor  # long [T]; one placeholder id per visual token (the model fills them in)
    visual: dict[str, torch.Tensor]  # backend-specific pixel tensors, each with a leading batch dim of 1
    text: str  # the prompt text before tokenization


@dataclass
class Batch:
    input_ids: torch.Tensor  # long [B, T], left-padded
    attention_mask: torch.Tensor  # long [B, T]
    visual: dict[str, torch.Tensor]  # each [B, ...]


@dataclass
class DecodeState:
    """Where a batch stands: the KV cache and, per row, which cache slots are real tokens."""

    cache: Any  # a transformers Cache
    attention_mask: torch.Tensor  # long [B, L]: 1 for real tokens, 0 for left padding
    length: int = 0  # L, cache length (same for every row)


@dataclass
class Step:
    logits: torch.Tensor  # float32 [B, k, V]: next-token logits after each of the k positions
    hidden: torch.Tensor | None = None  # [B, k, D] last-layer hidden states, when asked for


@dataclass
class Sampling:
    """Greedy when temperature == 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None):
    """Next token of each row of logits [B, V] -> long [B]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, sampling), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution sampling draws from: softmax(logits / T) restricted to the top-p nucleus. [..., V]."""
    probs = torch.softmax(logits.float() / max(sampling.temperature, 1e-6), dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < sampling.top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass
class VLM:
    """A loaded VLM. Backends subclass this and fill in the input side (`prompt_text`, `visual_inputs`,
    `expand_prompt`); the step functions below are shared."""

    model: torch.nn.Module
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    name: str = ""
    kind: str = ""
    extra: dict = field(default_factory=dict)
    # as a draft: ids below this mean the same tokens in the target's vocabulary, and only they may be proposed
    # (`decode.sources.shared_vocabulary`); None: all of the model's ids
    shared_vocab: int | None = None

    # ---- the input side: backend-specific -----------------------------------------------------------------
    def prompt_text(self, question: str) -> str:
        raise NotImplementedError

    def visual_inputs(self, sample) -> dict[str, torch.Tensor]:
        """Pixel tensors for one sample of the Data API, batch dim 1."""
        raise NotImplementedError

    def expand_prompt(self, text: str, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token ids of the prompt, long [T], with the visual placeholder(s) as the model expects them."""
        raise NotImplementedError

    def visual_kwargs(self, visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """How the model's forward takes the visual tensors (default: as they are)."""
        return visual

    # ---- properties ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: the first floating parameter's (quantized weights are integer)."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @property
    def vocab_size(self) -> int:
        """Logit width (may exceed the tokenizer's size: embeddings are often padded)."""
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_id

    # ---- inputs -------------------------------------------------------------------------------------------
    def prepare(self, sample, question: str) -> Prompt:
        visual = self.visual_inputs(sample)
        text = self.prompt_text(question)
        return Prompt(self.expand_prompt(text, visual), visual, text)

    def collate(self, prompts: list[Prompt]) -> Batch:
        """Left-pad prompts into one batch."""
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p.input_ids) :] = p.input_ids
            mask[i, width - len(p.input_ids) :] = 1
        visual = {k: torch.cat([p.visual[k] for p in prompts]) for k in prompts[0].visual}
        return Batch(ids, mask, visual)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Ids outside the vocabulary crash deep inside a CUDA kernel; refuse them here instead."""
        real = tokens[tokens >= 0]
        if real.numel() and int(real.max()) >= self.model.get_input_embeddings().weight.shape[0]:
            raise SpecalignError(
                f"{self.name}: token id {int(real.max())} is outside the vocabulary "
                f"({self.model.get_input_embeddings().weight.shape[0]} embeddings)"
            )

    # ---- steps --------------------------------------------------------------------------------------------
    def _run(self, state: DecodeState | None, input_ids, attention_mask, return_hidden, **visual):
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions[:, -input_ids.shape[1] :],
            use_cache=True,
            output_hidden_states=return_hidden,
            return_dict=True,
            **{_CACHE_KW: None if state is None else state.cache},
            **visual,
        )
        hidden = out.hidden_states[-1] if return_hidden else None
        return out, hidden

    @torch.inference_mode()
    def prefill(self, batch: Batch, return_hidden: bool = False, all_logits: bool = False):
        """Encode the visual input and the prompt. Returns (state, Step with logits [B, 1, V]; all
        positions [B, T, V] when all_logits)."""
        self.check_tokens(batch.input_ids)
        dev = self.device
        mask = batch.attention_mask.to(dev)
        visual = {k: v.to(dev, self.dtype if v.is_floating_point() else v.dtype) for k, v in batch.visual.items()}
        out, hidden = self._run(None, batch.input_ids.to(dev), mask, return_hidden, **self.visual_kwargs(visual))
        logits = out.logits if all_logits else out.logits[:, -1:]
        if hidden is not None and not all_logits:
            hidden = hidden[:, -1:]
        cache_len = _cache(out).get_seq_length()
        if cache_len != mask.shape[1]:  # backends expand visual placeholders in input_ids, never inside the model
            raise RuntimeError(f"{self.name}: cache holds {cache_len} slots for a {mask.shape[1]}-token prompt")
        state = DecodeState(_cache(out), mask, cache_len)
        return state, Step(logits.float(), hidden)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, state: DecodeState, return_hidden: bool = False) -> Step:
        """Append tokens long [B, k] to every row; logits [B, k, V] (decode: k = 1; verify: k = gamma + 1)."""
        self.check_tokens(tokens)
        tokens = tokens.to(self.device)
        ones = torch.ones_like(tokens, dtype=state.attention_mask.dtype)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
        out, hidden = self._run(state, tokens, state.attention_mask, return_hidden)
        state.cache = _cache(out)
        state.length += tokens.shape[1]
        return Step(out.logits.float(), hidden)

    def rollback(self, state: DecodeState, length: int) -> None:
        """Keep the first `length` cache slots (drop rejected tokens)."""
        if length > state.length:
            raise ValueError(f"cannot roll forward: cache holds {state.length}, asked for {length}")
        state.cache.crop(length - state.length)  # a negative count drops from the end (transformers 5.17-5.24)
        state.attention_mask = state.attention_mask[:, :length]
        state.length = length

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], max_new_tokens: int = 50, sampling: Sampling | None = None):
        """Plain autoregressive decoding; stops a row at EOS. Returns the new tokens of each prompt."""
        sampling = sampling or Sampling()
        gen = None
        if sampling.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        state, step = self.prefill(self.collate(prompts))
        out = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            token = sample_token(step.logits[:, -1], sampling, gen)
            token = torch.where(done, torch.full_like(token, self.pad_token_id), token)
            for r in range(len(prompts)):
                if not done[r]:
                    out[r].append(int(token[r]))
            done |= token == self.eos_token_id
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            step = self.forward(token[:, None], state)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def answer(self, sample, question: str, max_new_tokens: int = 60, sampling: Sampling | None = None) -> str:
        return self.decode(self.generate([self.prepare(sample, question)], max_new_tokens, sampling)[0])


def _cache(out):
    """The KV cache of a model output (renamed from past_key_values to cache in transformers 5.24)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
