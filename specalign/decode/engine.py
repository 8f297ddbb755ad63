"""A static-KV-cache decode engine over any backend's Llama language model (gpt-fast style).

The engine reuses the model's own modules (projections, norms, MLPs, rotary embedding, LM head), so it computes
what the transformers model computes, but keeps the KV cache in preallocated tensors [B, H_kv, max_len, D]:

    engine = Engine(vlm, max_len=2304)
    logits = prefill(engine, embeds)              # visual + prompt embeddings [B, T, D] -> next-token logits [B, V]
    logits = decode_one_token(engine, token)      # token [B, 1] -> [B, V]; the CUDA-graph path on a GPU
    logits = verify(engine, tokens)               # tokens [B, k] -> [B, k, V]: one forward over k positions
    engine.rollback(length)                       # drop rejected tokens: just a length (stale slots are masked)
    logits = engine.run(tokens, parents=parents)  # a draft tree in one forward (each token sees its ancestors)
    engine.keep(start, path)                      # keep the accepted path's keys and values, drop the rest

`Engine(vlm, features=(layer, ...))` also keeps, after every forward, the hidden states a draft head reads
(`engine.features` [B, T, F]). A draft head (`align.heads.DraftHead`: one Llama layer whose input is
fc([feature ; embedding])) runs on the same engine: its `inputs(features, tokens, context)` replaces the token
embedding, so it gets the static cache, rollback, trees and CUDA graphs of the target.

On a GPU, `engine.graphs = True` replays CUDA graphs captured per (batch, k) shape: no launch overhead, no compile.
Batches are left-padded: `pad` [B, T] marks prompt padding, and positions count real tokens only, so a padded row
computes what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specalign.decode.attention import MAX_ROWS, ancestors, block_mask, split_kv_attention
from specalign.decode.gemv import check_layer, decode_layer, runs_on
from specalign.errors import SpecalignError

BLOCK_LENGTHS = 32  # verify lengths that each get their own compiled layer halves (`Engine(compile_blocks=True)`)
ATTENTIONS = ("sdpa", "split")  # how decode steps and verify blocks attend (`Engine(attention=...)`)
# which forwards run q/k/v and gate/up as one matmul each (`Engine(fuse=...)`): "none", "blocks" of 2..MAX_ROWS
# tokens (verify chains and trees: weight-bound GEMMs, where one wide GEMM beats three narrow ones) or "all" (also
# the one-token step and prefills, which measured no faster so); benchmarks/engine_floor.py and decode_7b.py
FUSINGS = ("none", "blocks", "all")
# inductor's options for the compiled one-token step (`Engine(tune=...)`): coordinate-descent tuning is gpt-fast's
# setting; "autotune" is torch.compile's mode "max-autotune-no-cudagraphs" (we capture our own graphs), which also
# widens the configs its one-row reductions are tuned over (benchmarks/block_matmul.py)
TUNINGS = {"none": {}, "coordinate": {"coordinate_descent_tuning": True},
           "autotune": {"max_autotune": True, "coordinate_descent_tuning": True}}  # fmt: skip
# named settings for a speculating target (`speculate --engine`; docs/benchmarks.md times them at 7B shape):
# "graphs" replays the model's modules in CUDA graphs, attention through SDPA; "split" attends through the split-KV
# kernels and runs verify blocks with q/k/v and gate/up fused (engine-owned copies of those weights) and compiled;
# "gemv" also runs the one-token step as decode.gemv's Triton kernels (batch 1, Llama layers)
ENGINES = {"graphs": {}, "split": {"attention": "split", "fuse": "blocks", "compile_blocks": True},
           "gemv": {"gemv": True, "attention": "split", "fuse": "blocks", "compile_blocks": True}}  # fmt: skip


def engine_options(name: str, device: torch.device) -> dict:
    """`Engine` keyword arguments of the setting `name` (`ENGINES`) on `device`: off a GPU the blocks are not
    compiled (inductor's CPU compile would outlast the answers)."""
    options = dict(ENGINES[name])
    if device.type != "cuda":
        options.pop("compile_blocks", None)
    return options


def language_model(vlm):
    """(LlamaModel-like module with embed_tokens / layers / norm / rotary_emb, lm_head) of a backend, or of a draft
    head, which is such a module itself (with `inputs` in place of its own embeddings)."""
    if hasattr(vlm, "inputs") and hasattr(vlm, "layers"):
        return vlm, vlm.lm_head
    inner = vlm.model.model
    lm = getattr(inner, "language_model", inner)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(lm, name):
            raise SpecalignError(f"{vlm.name}: its language model has no `{name}`: not a Llama-family model")
    return lm, vlm.model.lm_head


def apply_rotary(q, k, cos, sin):
    """Llama rotary embedding: q/k [B, H, T, D], cos/sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@dataclass
class FusedWeights:
    """One layer's q/k/v and gate/up projections concatenated: (weight, bias or None) for F.linear."""

    qkv: tuple
    qkv_sizes: list[int]
    gate_up: tuple


def fused_weights(layer) -> FusedWeights:
    """A Llama decoder layer's projections as two matmuls (a GEMM of a few rows is one pass over its weight with a
    fixed cost on top: fewer, wider ones waste less). Copies: the layer's own weights stay as they are."""
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(mlp, "gate_proj", None) is None:
        raise SpecalignError("fuse: this MLP has no gate_proj/up_proj (not a Llama MLP)")
    proj = (attn.q_proj, attn.k_proj, attn.v_proj)
    w = torch.cat([p.weight for p in proj]).detach()
    b = torch.cat([p.bias for p in proj]).detach() if proj[0].bias is not None else None
    gu = (mlp.gate_proj, mlp.up_proj)
    gb = torch.cat([p.bias for p in gu]).detach() if gu[0].bias is not None else None
    return FusedWeights((w, b), [p.weight.shape[0] for p in proj], (torch.cat([p.weight for p in gu]).detach(), gb))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    start: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor | None = None
    inputs: torch.Tensor | None = None  # a head's input features [B, T, F]
    positions: torch.Tensor | None = None
    attend: torch.Tensor | None = None
    parents: torch.Tensor | None = None


class Engine:
    """One model's language side with a static KV cache of `max_len` slots for `batch` rows."""

    def __init__(self, vlm, max_len: int, batch: int = 1, compile: bool = False, fuse: str = "none",
                 tune: str = "coordinate", fp32_head: bool = False, features: tuple[int, ...] = (),
                 attention: str = "sdpa", compile_blocks: bool = False, gemv: bool = False):  # fmt: skip
        """compile: torch.compile the one-token decode step (fuses the element-wise work between the weight
        reads; on a GPU the compiled step is then captured as a CUDA graph like the others).
        tune: with compile, how inductor tunes the step (`TUNINGS`): "coordinate" (coordinate-descent tuning,
        gpt-fast's setting: it also turns each one-row matmul into a Triton reduction tuned for memory bandwidth
        instead of a cuBLAS GEMV), "autotune" (that, over more configs; compiles longer) or "none".
        fuse: which forwards run one q/k/v and one gate/up matmul per layer instead of three and two (`FUSINGS`).
        The joined weights are the engine's own copies: they cost those weights' memory again (9 GB at 7B), so
        the default is "none". "blocks" suits an engine that verifies (a speculating target): at 7B shape its
        64-node tree verify took 5.6 ms instead of 6.0. (Views into the joined weights would save the memory, but
        the compiled one-token step read through them measured 4.96 ms/token against 4.74 in one A/B.)
        fp32_head: logits from an fp32 copy of the LM head. bf16 logits keep 8 bits of mantissa, so the top two tie
        exactly now and then (7 of 48 mini-target answers, scripts/logit_margins.py), and a one-row decode step and
        a k-row verify may break the tie apart on a GPU: greedy SD then leaves the target-alone answer.
        features: hidden states kept after every forward in `self.features` [B, T, F] (concatenated in this order):
        index i < n_layers is decoder layer i's output, n_layers the final normed state (what the LM head reads).
        attention: how decode steps and verify blocks (chains, trees) attend: "sdpa" (torch's kernels, over every
        slot with a mask) or "split" (`decode.attention`: split-KV over the used slots only). A prompt without
        padding (causal over itself), any block longer than `attention.MAX_ROWS` and a block with its own `attend`
        mask use SDPA either way.
        compile_blocks: also torch.compile the many-token forwards: prefill, verify chains and trees. Regional: one
        decoder layer's work before and after its attention is compiled, without the tuning, and serves every
        layer (the weights are inputs), so it compiles in seconds where the whole forward takes minutes; it gives
        up only the fusion across a layer's boundary. Prefills compile for their first length, then once more with
        the length dynamic (prompts come in many lengths); verify blocks compile for each length (up to
        BLOCK_LENGTHS of them; a few in use, each captured as its own CUDA graph anyway): static sizes let inductor
        fit each length's kernels (at 7B shape a 64-node tree's graph took 5.15 ms against 5.22 through the dynamic
        ones).
        gemv: the one-token step runs each decoder layer as `decode.gemv`'s Triton kernels (four matrix-vector
        products with the norms, rotary, cache write, SiLU gate and residuals fused in) instead of the model's
        modules: at 7B shape they read the weights faster than inductor's tuned reductions. Needs attention="split",
        batch 1 and Llama layers, and replaces `compile` (compiled by inductor, the step hit an illegal memory access
        on the GPU). Off a GPU the step keeps the model's modules (the kernels run there only in Triton's
        interpreter)."""
        self.vlm = vlm
        self.lm, self.head = language_model(vlm)
        if fp32_head and self.head.weight.dtype != torch.float32:
            weight = self.head.weight.detach().float()
            self.head = lambda h: F.linear(h.float(), weight)
        if fuse not in FUSINGS:
            raise SpecalignError(f"{vlm.name}: unknown fuse {fuse!r}: choose {', '.join(FUSINGS)}")
        self.fuse = fuse
        self.fused = [fused_weights(layer) for layer in self.lm.layers] if fuse != "none" else None
        n_layers = len(self.lm.layers)
        if any(not 0 <= i <= n_layers for i in features):
            raise SpecalignError(f"{vlm.name}: feature layers {list(features)} outside 0..{n_layers} "
                                 f"({n_layers} is the final normed state)")  # fmt: skip
        self.feature_layers = tuple(features)
        self.features: torch.Tensor | None = None  # [B, T, F] of the last forward, when feature_layers
        self.context: torch.Tensor | None = None  # a head's per-prompt context (event tokens) [B, N, E]
        cfg = self.lm.config
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.gqa = self.n_kv != cfg.num_attention_heads  # a plain bool: SDPA refuses a symbolic one
        self.device, self.dtype = vlm.device, vlm.dtype
        self.max_len = max_len
        # one tensor [layers, 2, B, H_kv, max_len, D]: `keep` moves a path's slots in every layer with two kernels
        self.kv = torch.zeros(n_layers, 2, batch, self.n_kv, max_len, self.head_dim, device=self.device,
                              dtype=self.dtype)  # fmt: skip
        self.k, self.v = list(self.kv[:, 0]), list(self.kv[:, 1])
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)  # real (non-pad) slots
        self.length = 0  # slots in use (same for every row)
        self.count = torch.zeros(batch, dtype=torch.long, device=self.device)  # real tokens per row = next position
        self.graphs: dict | bool = {} if self.device.type == "cuda" else False
        if tune not in TUNINGS:
            raise SpecalignError(f"{vlm.name}: unknown tune {tune!r}: choose {', '.join(TUNINGS)}")
        self.decode_step = torch.compile(self._step, dynamic=False, options=TUNINGS[tune]) if compile else self._step
        # no tuning here: it turns one-row matmuls into Triton reductions, and k-row blocks are cuBLAS's ground
        # (coordinate-descent tuning also made a 64-node tree's graph slower: 5.78 ms against 5.22). Prefills:
        # automatic dynamic shapes, since prompts come in many lengths, so the second length recompiles with only the
        # length symbolic; the model's and the cache's sizes stay constants in the kernels' indexing (dynamic=True
        # makes them symbols too, and every element-wise kernel then divides by them at run time). Verify blocks:
        # static, a compile per length.
        self.fill_layer = self.block_layer = None
        if compile_blocks:
            self.fill_layer = (torch.compile(self._project, dynamic=None), torch.compile(self._finish, dynamic=None))
            self.block_layer = (torch.compile(self._project_block, dynamic=False),
                                torch.compile(self._finish_block, dynamic=False))  # fmt: skip
            # torch.compile's limit is 8 compiles a function; a length takes two of the project half (the first
            # layer has no MLP output pending), and past the limit a length would run uncompiled
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * BLOCK_LENGTHS)
        if attention not in ATTENTIONS:
            raise SpecalignError(f"{vlm.name}: unknown attention {attention!r}: choose {' or '.join(ATTENTIONS)}")
        self.attention = attention
        if gemv:
            if attention != "split" or batch != 1 or compile:
                raise SpecalignError(f"{vlm.name}: gemv needs attention='split', batch 1 and no compile (got "
                                     f"{attention!r}, batch {batch}, compile={compile})")  # fmt: skip
            for layer in self.lm.layers:
                check_layer(layer, self.head_dim, vlm.name)
        self.gemv = gemv

    # ---- one forward over T new tokens at slots [start, start + T) --------------------------------------------
    def _forward(
        self, x: torch.Tensor, start, positions=None, attend=None, tree=None, causal: bool = False, fill: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] embeddings written to slots [start, start + T) -> (last-layer hidden [B, T, D], the feature
        layers [B, T, F] or None).

        start: an int, or a tensor [] inside CUDA graphs (so they replay at any offset). positions [B, T]: by
        default each row's next ones (padding is not counted). Which slots each new token sees: every real slot
        before the block, and within it its own and the earlier ones (a chain), or those `tree` bool [B, T, T] marks
        (a verify tree: its ancestors; see `attention.block_mask`); or, given `attend` bool [B, T, max_len], the
        real ones of those (any pattern, e.g. a head's tree expansion). causal: the block starts at slot 0 and
        every token is real (a prompt without padding), so attention runs causally over the block alone, which
        lets SDPA use its flash kernel. fill: a prefill (with compile_blocks, through the halves compiled for any
        length)."""
        B, T, _ = x.shape
        slots = start + torch.arange(T, device=x.device)  # [T]
        if positions is None:
            positions = self.count[:, None] + torch.arange(T, device=x.device)  # [B, T]
        cos, sin = self.lm.rotary_emb(x, positions)
        # split-KV attention reads only the slots in use: how many (as the kernels' int32, made once here rather than
        # in every layer); it takes the real slots and the block's tree as they are, SDPA the whole mask
        split = self.attention == "split" and not causal and T <= MAX_ROWS and attend is None
        used = (slots[-1:] + 1).int() if split else None
        if split:
            mask = None
        elif attend is not None:
            mask = (attend & self.valid[:, None, :])[:, None]  # [B, 1, T, max_len]
        else:
            mask = block_mask(self.valid, start + T, T, tree)[:, None]
        # a many-token block through the compiled layer halves (inside the compiled decode step: traced whole)
        regional = self.block_layer is not None and T > 1 and not torch.compiler.is_compiling()
        project, finish = (self.fill_layer if fill else self.block_layer) if regional else (self._project, self._finish)
        joined = self.fuse == "all" or (self.fuse == "blocks" and 1 < T <= MAX_ROWS)
        kernels = self.gemv and split and T == 1 and runs_on(x)
        kept = {}
        delta = None  # the last layer's MLP output, not yet added to x: the next norm adds it in the same kernel
        for i, layer in enumerate(self.lm.layers):
            if kernels:
                x = decode_layer(layer, x, cos, sin, slots, self.k[i], self.v[i], self.valid, used)
            else:
                fused = self.fused[i] if joined else None
                q, x = project(layer, fused, x, delta, cos, sin, slots, self.k[i], self.v[i])
                if split:
                    o = split_kv_attention(q, self.k[i], self.v[i], self.valid, used, tree)
                else:
                    o = self._attend(i, q, mask, causal)
                x, delta = finish(layer, fused, x, o)
            if i in self.feature_layers:
                x, delta = x if delta is None else x + delta, None
                kept[i] = x
        if delta is not None:
            x = x + delta
        kept[len(self.lm.layers)] = x = self.lm.norm(x)
        feats = torch.cat([kept[i] for i in self.feature_layers], dim=-1) if self.feature_layers else None
        return x, feats

    def _project(self, layer, fused: FusedWeights | None, x, delta, cos, sin, slots, k_cache,
                 v_cache) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A decoder layer up to its attention: x [B, T, D] plus delta (the previous layer's MLP output, or None)
        -> (q [B, H, T, head_dim] rotated, x + delta: the layer's input); the new tokens' keys and values go into
        the layer's cache k_cache/v_cache [B, H_kv, max_len, head_dim] at `slots` [T]."""
        B, T, _ = x.shape
        attn = layer.self_attn
        if delta is not None:
            x = x + delta
        h = layer.input_layernorm(x)
        if fused is None:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            q, k, v = F.linear(h, *fused.qkv).split(fused.qkv_sizes, dim=-1)
        q = q.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype))
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v)
        return q, x

    def _finish(self, layer, fused: FusedWeights | None, x: torch.Tensor,
                o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A decoder layer after its attention: x [B, T, D] (the layer's input), o [B, H, T, head_dim] -> (x plus
        the attention's output, the MLP's output [B, T, D]): their sum is the layer's output, left to the next
        layer's norm (compiled by halves, the sum is then no kernel of its own)."""
        B, T, _ = x.shape
        mlp = layer.mlp
        x = x + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        h = layer.post_attention_layernorm(x)
        if fused is None:
            return x, mlp(h)
        gate, up = F.linear(h, *fused.gate_up).chunk(2, dim=-1)
        return x, mlp.down_proj(mlp.act_fn(gate) * up)

    # the same halves under code objects of their own: torch.compile keeps its compiles (and their limit) per code
    # object, so the blocks' compiles per length stay apart from the prefills' dynamic one
    def _project_block(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        return self._project(*args)

    def _finish_block(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        return self._finish(*args)

    def embed(self, tokens: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> the first layer's input [B, T, D]: the token embeddings, or for a draft head its
        `inputs` over its input features [B, T, F] (and the per-prompt context, e.g. event tokens)."""
        if inputs is None:
            return self.lm.embed_tokens(tokens)
        return self.lm.inputs(inputs, tokens, self.context)

    def _attend(self, i: int, q: torch.Tensor, mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Layer i's attention of q [B, H, T, D] over its cache through SDPA, mask [B, 1, T, max_len] ->
        [B, H, T, D]. causal: see `_forward`."""
        if causal:
            T = q.shape[2]
            return F.scaled_dot_product_attention(q, self.k[i][:, :, :T], self.v[i][:, :, :T], is_causal=True,
                                                  enable_gqa=self.gqa)  # fmt: skip
        return F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, enable_gqa=self.gqa)

    def _step(self, tokens: torch.Tensor, start, inputs: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, attend: torch.Tensor | None = None,
              parents: torch.Tensor | None = None):  # fmt: skip
        """-> (logits float32 [B, T, V], features [B, T, F] or None)."""
        # the new slots are real: marked here, inside the graph, a host launch fewer before each replay
        self.valid.index_fill_(1, start + torch.arange(tokens.shape[1], device=self.device), True)
        tree = None
        if parents is not None:  # a verify tree: its mask and positions made here, inside the block's graph
            tree, depth = ancestors(parents)
            positions = self.count[:, None] + depth
        hidden, feats = self._forward(self.embed(tokens, inputs), start, positions, attend, tree)
        return self.head(hidden).float(), feats

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, inputs: torch.Tensor | None = None, positions: torch.Tensor | None = None,
            attend: torch.Tensor | None = None, parents: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Append tokens long [B, k] after the current length -> logits float32 [B, k, V]; `self.features` holds
        their feature layers. inputs [B, k, F]: a draft head's input features; parents long [B, k] (a verify
        tree: each token's parent in the block, -1 for the root; it sees its ancestors, at the next position plus
        its depth: `attention.ancestors`); or positions long [B, k] with attend bool [B, k, max_len] (any slots):
        see `_forward`."""
        B, T = tokens.shape
        if self.length + T > self.max_len:
            raise SpecalignError(f"{self.vlm.name}: {self.length + T} tokens exceed the engine's cache of "
                                 f"{self.max_len} slots (raise max_len)")  # fmt: skip
        extra = (inputs, positions, attend, parents)
        plain = all(x is None for x in extra)
        step = self.decode_step if T == 1 and plain else self._step
        if self.graphs is False:
            # compiled: a tensor on the device, as inside CUDA graphs, so one compile serves both
            start = torch.tensor(self.length, device=self.device) if step is not self._step else self.length
            extra = [x if x is None else x.to(self.device) for x in extra]
            logits, feats = step(tokens.to(self.device), start, *extra)
        else:
            # a head's input width differs between the target's features and its own outputs: part of the key
            width = 0 if inputs is None else inputs.shape[-1]
            key = (B, T) if plain else (B, T, *(x is not None for x in extra), width)
            with torch.cuda.device(self.device):  # a draft on a second GPU captures and replays on that GPU
                g = self.graphs.get(key) or self._capture(key, B, T, extra)
                # non-blocking: inputs from the host (a tree's tokens and parents) go without waiting for the GPU
                g.tokens.copy_(tokens, non_blocking=True)
                for buf, x in zip((g.inputs, g.positions, g.attend, g.parents), extra, strict=True):
                    if x is not None:
                        buf.copy_(x, non_blocking=True)
                g.start.fill_(self.length)  # a kernel argument, not a host-to-device copy: the host never waits
                g.graph.replay()
                logits = g.logits.clone()  # the next replay overwrites the graph's output buffers
                feats = g.features.clone() if g.features is not None else None
        self.features = feats
        self.length += T
        self.count += T
        return logits

    def _capture(self, key: tuple, B: int, T: int, extra: tuple) -> _Graph:
        tokens = torch.zeros(B, T, dtype=torch.long, device=self.device)
        start = torch.tensor(self.length, device=self.device)
        bufs = [None if x is None else torch.zeros_like(x, device=self.device) for x in extra]
        if bufs[1] is not None:  # positions: the next ones, as a causal block would have
            bufs[1].copy_(self.count[:, None] + torch.arange(T, device=self.device))
        if bufs[3] is not None:  # a tree: a chain's (any tree would do)
            bufs[3].copy_(torch.arange(-1, T - 1, device=self.device))
        plain = all(x is None for x in extra)
        step = self.decode_step if T == 1 and plain else self._step
        saved = self.kv.clone() if self.length else None
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):  # warm-up outside the graph (allocator, cuBLAS handles, compiling)
            for _ in range(2):
                step(tokens, start, *bufs)
        torch.cuda.current_stream(self.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        # torch's default capture stream lives on the first device that captured: give each engine its own
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
            logits, feats = step(tokens, start, *bufs)
        if saved is not None:  # the warm-up and capture wrote zeros' K/V into the live slots: put the real ones back
            self.kv.copy_(saved)
        self.graphs[key] = _Graph(graph, tokens, start, logits, feats, *bufs)
        return self.graphs[key]

    def keep(self, start: int, path: torch.Tensor) -> None:
        """After a tree block written at slots [start, ...): move the slots start + path (long [n], ascending, the
        accepted path) to start .. start + n - 1 and drop everything after (their keys and values stay exact:
        a path token saw only its ancestors, which are the path before it)."""
        n = path.numel()
        src = start + path.to(self.device)
        dst = start + torch.arange(n, device=self.device)
        self.kv.index_copy_(4, dst, self.kv.index_select(4, src))
        self.rollback(start + n)

    def rollback(self, length: int) -> None:
        """Keep the first `length` slots; later ones are masked and will be overwritten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length}")
        self.valid[:, length:] = False
        self.count -= self.length - length  # slots after a prompt are real tokens in every row
        self.length = length

    def reset(self) -> None:
        self.valid.zero_()
        self.count.zero_()
        self.length = 0


@torch.inference_mode()
def prefill(engine: Engine, embeds: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt embeddings [B, T, D] (left-padded; pad bool [B, T] True on padding) -> logits [B, V] of the last
    position. Starts a new sequence in the engine (eager: one call per prompt length is not worth a graph)."""
    B, T, _ = embeds.shape
    if T > engine.max_len:  # noqa: SIM300 (T is the prompt length)
        raise SpecalignError(f"{engine.vlm.name}: a {T}-token prompt does not fit the engine's cache of "
                             f"{engine.max_len} slots (raise max_len)")  # fmt: skip
    real = torch.ones(B, T, dtype=torch.bool, device=engine.device) if pad is None else ~pad.to(engine.device)
    return _fill(engine, embeds, real, 0)


def _fill(engine: Engine, embeds: torch.Tensor, real: torch.Tensor, offset: int) -> torch.Tensor:
    """Start new sequences: embeds [B, T, D] into slots [0, T), real bool [B, T] (False on padding), positions
    counted from `offset` (tokens that come before, e.g. a shared prefix) -> logits [B, V] of the last slot."""
    T = embeds.shape[1]
    engine.reset()
    engine.valid[:, :T] = real
    positions = offset + (real.long().cumsum(dim=1) - 1).clamp(min=0)
    causal = bool(real.all())  # no padding: attention over the prompt alone, causal (SDPA's flash kernel)
    x = embeds.to(engine.device, engine.dtype)
    if not x.is_inference():  # one kind of tensor into the compiled layers (their guards tell the two apart)
        x = x.clone()
    hidden, engine.features = engine._forward(x, 0, positions, causal=causal, fill=True)
    engine.length = T
    engine.count.copy_(offset + real.sum(dim=1))  # in place: captured graphs read this tensor
    return engine.head(hidden[:, -1]).float()


def decode_one_token(engine: Engine, token: torch.Tensor) -> torch.Tensor:
    """token long [B] or [B, 1] -> next-token logits float32 [B, V]."""
    return engine.run(token.reshape(-1, 1))[:, -1]


def verify(engine: Engine, tokens: torch.Tensor) -> torch.Tensor:
    """tokens long [B, k] (the last accepted token + k-1 proposals) -> logits float32 [B, k, V] after each."""
    return engine.run(tokens)


class _Captured(Exception):
    pass


@torch.inference_mode()
def prompt_embeds(vlm, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated Batch -> (embeddings [B, T, D] with the visual features in place, pad bool [B, T]).

    This is the model's own vision encode + splice: EventGPT exposes it (`embed_inputs`); for the transformers
    LLaVA family the embeddings are caught on their way into the language model, which is then not run."""
    vlm.check_tokens(batch.input_ids)
    dev = vlm.device
    ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    visual = {k: v.to(dev, vlm.dtype if v.is_floating_point() else v.dtype) for k, v in batch.visual.items()}
    if hasattr(vlm.model, "embed_inputs"):
        return vlm.model.embed_inputs(ids, **vlm.visual_kwargs(visual)), mask == 0
    caught = {}

    def catch(module, args, kwargs):
        caught["embeds"] = kwargs["inputs_embeds"]
        raise _Captured

    lm, _ = language_model(vlm)
    hook = lm.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        vlm.model(input_ids=ids, attention_mask=mask, **vlm.visual_kwargs(visual))
    except _Captured:
        pass
    finally:
        hook.remove()
    return caught["embeds"], mask == 0


class SharedPrefixEngine(Engine):
    """Rows that share a prompt prefix (the visual input and the template before the question): the prefix's
    K/V are computed once per sample and kept once, [S, H_kv, P, D]; each of the S x Q rows keeps only its own
    question and answer in the row cache [S * Q, H_kv, max_len, D]. Attention reads a sample's prefix once for
    all of its questions, so a decode step costs about S prefixes, not S x Q (what makes batched extraction
    fast at 2k-token visual prompts). Rows of sample s are s*Q .. s*Q + Q - 1."""

    def __init__(self, vlm, prefix_len: int, samples: int, questions: int, max_len: int):
        super().__init__(vlm, max_len, batch=samples * questions)
        self.prefix = Engine(vlm, prefix_len, batch=samples)
        self.prefix.graphs = False  # prefilled once per batch: eager
        self.samples, self.questions = samples, questions

    def _attend(self, i: int, q: torch.Tensor, mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
        # the rows' slots come after the shared prefix: never slot 0 of a whole causal prompt
        S, Q = self.samples, self.questions
        B, H, T, D = q.shape
        kp, vp = self.prefix.k[i], self.prefix.v[i]  # [S, H_kv, P, D]
        kr, vr = self.k[i], self.v[i]  # [B, H_kv, L, D]
        if self.n_kv != H:  # grouped-query attention: share each K/V head among its query heads
            kp, vp, kr, vr = (t.repeat_interleave(H // self.n_kv, dim=1) for t in (kp, vp, kr, vr))
        P = kp.shape[2]
        scale = D**-0.5
        # a sample's Q rows become Q * T queries against its one prefix
        qs = q.view(S, Q, H, T, D).transpose(1, 2).reshape(S, H, Q * T, D)
        sp = (qs @ kp.transpose(-1, -2)).view(S, H, Q, T, P).transpose(1, 2).reshape(B, H, T, P)
        sr = (q @ kr.transpose(-1, -2)).masked_fill(~mask, float("-inf"))  # [B, H, T, L]
        probs = torch.softmax(torch.cat([sp, sr], dim=-1).float() * scale, dim=-1).to(q.dtype)
        pp, pr = probs.split([P, probs.shape[-1] - P], dim=-1)
        pp = pp.view(S, Q, H, T, P).transpose(1, 2).reshape(S, H, Q * T, P)
        out = (pp @ vp).view(S, H, Q, T, D).transpose(1, 2).reshape(B, H, T, D)
        return out + pr @ vr


@torch.inference_mode()
def prefill_shared(engine: SharedPrefixEngine, prefix: torch.Tensor, suffix: torch.Tensor,
                   pad: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """prefix [S, P, D] (one per sample), suffix [S * Q, T, D] (each row's question, left-padded; pad bool
    [S * Q, T]) -> next-token logits [S * Q, V]. Starts new sequences in the engine."""
    prefill(engine.prefix, prefix)
    return _fill(engine, suffix, ~pad.to(engine.device), prefix.shape[1])
