"""A Llama decoder layer for one new token as four Triton matrix-vector products (GEMVs), everything else fused in.

    x = decode_layer(layer, x, cos, sin, slot, k_cache, v_cache, valid, used)   # x [1, 1, D] -> [1, 1, D]

At batch 1 a decode step reads every weight once and does little else, so its time is the weights' bytes over the
memory bandwidth the matmul kernels reach. A plain GEMV (each program a few whole rows, the row read in wide
chunks) reaches more of it than inductor's reductions, which also recompute the RMS norm in every program
(benchmarks/engine_floor.py). The layer's kernels:

1. `_gemv_qkv_kernel`: input norm, q/k/v projections, rotary embedding, and k/v written into the cache slot;
2. split-KV attention over the used slots (`decode.attention`: a kernel and its merge);
3. `_gemv_residual_kernel`: o projection plus the residual;
4. `_gemv_gate_up_kernel`: post-attention norm, gate and up projections and SiLU(gate) * up;
5. `_gemv_residual_kernel`: down projection plus the residual.

RMS norm folds into the product: W @ (g * x * r) = r * (W @ (g * x)) with r = rsqrt(mean(x^2) + eps) a scalar that
each program sums up from the same chunks of x it multiplies, so no program reads x twice. A program takes rows in
pairs that the epilogue needs together: a rotary pair (d, d + head_dim / 2) of one head, or a gate row and its up
row. The products accumulate in fp32 and round once, so results differ from the model's modules (which round
between ops) by bf16 rounding.

The kernels read the layer's own weights (no copies). Llama layers only: no biases, SiLU, RMS norm; one row
(batch 1). On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, for the tests).
"""

from __future__ import annotations

import os

import torch

from specalign.decode.attention import split_kv_attention
from specalign.errors import SpecalignError

# a sweep of the 7B-shaped step on an H200 (benchmarks/engine_floor.json's experiments): 2 pairs (4 rows, against
# which each program's reads of x and the norm weight are small) in chunks of 1,024 columns, 4 warps, took 4.09-4.19
# ms/token; 1 pair in chunks of 2,048 took 4.91
PAIRS = 2  # row pairs a program
BLOCK_K = 1024  # columns a program reads at a time
NUM_WARPS = 4
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels are defined

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the engine's model path only
    triton = None


def check_layer(layer, head_dim: int, name: str) -> None:
    """Refuse, in one line, a decoder layer these kernels do not compute."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None or getattr(p, "bias", None) is not None for p in projections):
        raise SpecalignError(f"{name}: gemv needs Llama layers (q/k/v/o and gate/up/down projections, no biases)")
    if not (isinstance(mlp.act_fn, torch.nn.SiLU) or type(mlp.act_fn).__name__ == "SiLUActivation"):  # torch's, HF's
        raise SpecalignError(f"{name}: gemv needs a SiLU MLP, not {type(mlp.act_fn).__name__}")
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        if not hasattr(norm, "variance_epsilon") or getattr(norm, "bias", None) is not None:
            raise SpecalignError(f"{name}: gemv needs RMS norms, not {type(norm).__name__}")
    if head_dim % (2 * PAIRS):  # a program's rotary pairs lie in one head
        raise SpecalignError(f"{name}: gemv takes {PAIRS} rotary pairs a program: head_dim {head_dim} must divide by "
                             f"{2 * PAIRS}")  # fmt: skip


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels can run on x's device: a GPU with Triton, or the CPU in Triton's interpreter."""
    return triton is not None and (x.is_cuda or INTERPRET)


def decode_layer(layer, x, cos, sin, slot, k_cache, v_cache, valid, used) -> torch.Tensor:
    """One new token through a Llama decoder layer. x [1, 1, D] (the layer's input), cos/sin [1, 1, head_dim] (its
    position's rotary), slot long [1] (its cache slot), k_cache/v_cache [1, H_kv, L, head_dim] (the layer's cache:
    the token's key and value are written at `slot`), valid bool [1, L] and used int [] (see
    `attention.split_kv_attention`) -> the layer's output [1, 1, D]."""
    attn, mlp = layer.self_attn, layer.mlp
    B, T, D = x.shape
    Hkv, hd = k_cache.shape[1], k_cache.shape[3]
    H = attn.q_proj.weight.shape[0] // hd
    x = x.reshape(D)
    q = torch.empty(H * hd, device=x.device, dtype=x.dtype)
    rows = (H + 2 * Hkv) * hd
    _gemv_qkv_kernel[(rows // (2 * PAIRS),)](
        x, layer.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
        cos.reshape(hd), sin.reshape(hd), q, k_cache, v_cache, slot.reshape(1), layer.input_layernorm.variance_epsilon,
        D, H, Hkv, k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        HD=hd, PAIRS=PAIRS, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )  # fmt: skip
    o = split_kv_attention(q.view(1, H, 1, hd), k_cache, v_cache, valid, used)  # [1, H, 1, hd]
    x = _residual(attn.o_proj.weight, o.reshape(H * hd), x)
    inter = mlp.gate_proj.weight.shape[0]
    h = torch.empty(inter, device=x.device, dtype=x.dtype)
    norm = layer.post_attention_layernorm
    _gemv_gate_up_kernel[(triton.cdiv(inter, PAIRS),)](
        x, norm.weight, mlp.gate_proj.weight, mlp.up_proj.weight, h, norm.variance_epsilon, inter, D, PAIRS=PAIRS,
        BLOCK_K=BLOCK_K, FULL=inter % PAIRS == 0, num_warps=NUM_WARPS,
    )  # fmt: skip
    return _residual(mlp.down_proj.weight, h, x).view(B, T, D)


def _residual(w: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x + w @ v: w [N, K], v [K], x [N] -> [N]."""
    N, K = w.shape
    y = torch.empty_like(x)
    _gemv_residual_kernel[(triton.cdiv(N, 2 * PAIRS),)](
        w, v, x, y, N, K, PAIRS=PAIRS, BLOCK_K=BLOCK_K, FULL=N % (2 * PAIRS) == 0, num_warps=NUM_WARPS,
    )  # fmt: skip
    return y


if triton is not None:

    @triton.jit
    def _pair_products(A, B, X, G, N, K, ra, rb, P: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                       FULL: tl.constexpr):  # fmt: skip
        """(A[ra] @ x', B[rb] @ x', sum of x^2): A/B [N, K] row-major, rows ra/rb [P], x' = G * X (NORM) or X.
        FULL: every row is below N; otherwise those past it read as 0."""
        acc_a = tl.zeros([P, BLOCK_K], tl.float32)
        acc_b = tl.zeros([P, BLOCK_K], tl.float32)
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + tl.arange(0, BLOCK_K)
            inside = c < K
            mask_a, mask_b = inside[None, :], inside[None, :]
            if not FULL:
                mask_a, mask_b = mask_a & (ra < N)[:, None], mask_b & (rb < N)[:, None]
            # the weights are read once a step: keep them from pushing x and the cache out of L2
            wa = tl.load(A + ra[:, None] * K + c[None, :], mask=mask_a, other=0.0, eviction_policy="evict_first")
            wb = tl.load(B + rb[:, None] * K + c[None, :], mask=mask_b, other=0.0, eviction_policy="evict_first")
            x = tl.load(X + c, mask=inside, other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                x = x * tl.load(G + c, mask=inside, other=0.0).to(tl.float32)
            acc_a += wa.to(tl.float32) * x[None, :]
            acc_b += wb.to(tl.float32) * x[None, :]
        return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1), tl.sum(squares, axis=0)

    @triton.jit
    def _gemv_qkv_kernel(X, G, WQ, WK, WV, COS, SIN, Q, KC, VC, SLOT, eps, K, H, HKV, skh, skl, svh, svl,
                         HD: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """PAIRS rotary pairs (j, j + HD/2) of one head of q, k or v: rms_norm(X) * G through the projection, rotated
        (q, k), and stored: q into Q [H * HD], k/v into the caches' slot SLOT."""
        half: tl.constexpr = HD // 2
        p = tl.program_id(0) * PAIRS
        head = p // half  # over the q, k and v heads in that order
        j = p % half + tl.arange(0, PAIRS)
        if head < H:
            W, h = WQ, head
        elif head < H + HKV:
            W, h = WK, head - H
        else:
            W, h = WV, head - H - HKV
        lo, hi, squares = _pair_products(W, W, X, G, 0, K, h * HD + j, h * HD + half + j, PAIRS, BLOCK_K, True, True)
        r = 1.0 / tl.sqrt(squares / K + eps)
        lo, hi = lo * r, hi * r
        if head < H + HKV:  # rotary: (lo, hi) -> (lo cos - hi sin, hi cos + lo sin), as rotate_half does
            c_lo, c_hi = tl.load(COS + j).to(tl.float32), tl.load(COS + half + j).to(tl.float32)
            s_lo, s_hi = tl.load(SIN + j).to(tl.float32), tl.load(SIN + half + j).to(tl.float32)
            lo, hi = lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi
        slot = tl.load(SLOT)
        if head < H:
            tl.store(Q + h * HD + j, lo.to(Q.dtype.element_ty))
            tl.store(Q + h * HD + half + j, hi.to(Q.dtype.element_ty))
        elif head < H + HKV:
            at = KC + h * skh + slot * skl + j
            tl.store(at, lo.to(KC.dtype.element_ty))
            tl.store(at + half, hi.to(KC.dtype.element_ty))
        else:
            at = VC + h * svh + slot * svl + j
            tl.store(at, lo.to(VC.dtype.element_ty))
            tl.store(at + half, hi.to(VC.dtype.element_ty))

    @triton.jit
    def _gemv_gate_up_kernel(X, G, WG, WU, OUT, eps, N, K, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr,
                             FULL: tl.constexpr):  # fmt: skip
        """PAIRS of the N rows of SiLU(gate(x')) * up(x') with x' = rms_norm(X) * G, into OUT."""
        i = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
        gate, up, squares = _pair_products(WG, WU, X, G, N, K, i, i, PAIRS, BLOCK_K, True, FULL)
        r = 1.0 / tl.sqrt(squares / K + eps)
        gate, up = gate * r, up * r
        tl.store(OUT + i, (gate * tl.sigmoid(gate) * up).to(OUT.dtype.element_ty), mask=i < N)

    @triton.jit
    def _gemv_residual_kernel(W, V, X, Y, N, K, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr, FULL: tl.constexpr):
        """2 * PAIRS of the N rows of Y = X + W @ V."""
        i = tl.program_id(0) * 2 * PAIRS + tl.arange(0, PAIRS)
        a, b, _ = _pair_products(W, W, V, V, N, K, i, i + PAIRS, PAIRS, BLOCK_K, False, FULL)
        x = tl.load(X + i, mask=i < N, other=0.0).to(tl.float32)
        tl.store(Y + i, (x + a).to(Y.dtype.element_ty), mask=i < N)
        x = tl.load(X + i + PAIRS, mask=i + PAIRS < N, other=0.0).to(tl.float32)
        tl.store(Y + i + PAIRS, (x + b).to(Y.dtype.element_ty), mask=i + PAIRS < N)
