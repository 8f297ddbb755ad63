"""Split-KV ("flash-decoding") attention of new tokens over the static cache.

    out = split_kv_attention(q, k, v, valid, used, tree)   # q [B, H, T, D], k/v [B, H_kv, L, D] -> [B, H, T, D]

SDPA's kernels give each (row, head, tile of 64-128 queries) one thread block, so at batch 1 a 7B model's 32 heads
keep 32 of an H200's 132 SMs reading the cache, for one new token and for a 64-node tree alike. Here the slots
are cut into `SPLITS` chunks and every (row, head, chunk) is its own program; a second pass merges the chunks'
partial softmaxes (each keeps its max and its sum, so the merge is exact up to rounding). `used` (long [], on the
device) is the number of slots in use: chunks past it stop at once, so a step reads only the used slots, and a
CUDA graph replays at any length.

One new token sees every real slot below `used` (valid [B, L]) and runs a kernel of vector products. A block of
T tokens (a verify chain or tree, in the last T used slots) sees every real slot before it and, within the block,
a chain's earlier tokens or a tree node's ancestors (`tree` [B, T, T]); it runs a kernel that takes several of
its queries at a time through tensor-core products (`BLOCK_LAUNCH`). Before the block one mask row serves all of
them, so only the block's own slots read a mask per query (`block_mask` spells the whole mask out).

On a GPU with Triton the chunks run as Triton kernels; elsewhere `split_kv_reference` computes the same chunked
algorithm with torch ops (the tests hold the kernels to it, in Triton's interpreter on the CPU).
"""

from __future__ import annotations

import torch

# benchmarks/split_kv.py's sweep on an H200 (7B shape, batch 1): fastest or within 3 % of it at 512, 2080 and 4096
# slots; 32 heads x 32 chunks keep the 132 SMs busy, and two warps per program leave more programs resident
SPLITS = 32  # chunks per (row, head)
BLOCK_N = 64  # slots a program reads per iteration
NUM_WARPS = 2
MAX_ROWS = 128  # longer blocks (a padded prompt) keep SDPA's tiles busy on their own: `Engine` leaves them to it
# a verify block's launch by its size: (up to this many queries, queries per program, warps, chunks per (row, head),
# software-pipeline stages).
# benchmarks/split_kv.py's block sweep on an H200 (7B shape, 2,080 and 4,096 slots): the fastest at both for blocks
# of 17, 33 and 65 (trees), within 7 % for 2 (a chain). Longer blocks take more queries per program (each chunk's
# K/V read once for all of them) and fewer chunks (each writes T x D partial floats that the merge reads back).
BLOCK_LAUNCH = ((16, 16, 4, 16, 2), (64, 64, 4, 8, 2), (MAX_ROWS, 128, 8, 4, 3))
MERGE_TILE = 32  # chunks a merge program takes (rows x chunks per row)
NEG = -1.0e30  # "no slot yet": finite, so exp(NEG - NEG) never makes a NaN

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: split_kv_reference only
    triton = None


def _chunks(slots: int, splits: int = SPLITS, block_n: int = BLOCK_N) -> tuple[int, int]:
    """(slots per chunk, chunks): at most `splits` chunks cover the cache, each a whole number of `block_n` blocks."""
    chunk = max(block_n, -(-slots // (splits * block_n)) * block_n)
    return chunk, -(-slots // chunk)


def merge(out: torch.Tensor, peak: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Chunks' partial results -> attention output. out [..., S, D] (unnormalised sums of p * v), peak and total
    [..., S] (each chunk's score max and sum of exp(score - max)) -> [..., D] float32."""
    top = peak.amax(-1, keepdim=True)
    w = torch.exp(peak - top) * (total > 0)  # an empty chunk (past `used`, or all padding) weighs nothing
    return (w[..., None] * out).sum(-2) / (w * total).sum(-1, keepdim=True)


def block_mask(valid: torch.Tensor, used, T: int, tree: torch.Tensor | None = None) -> torch.Tensor:
    """The slots each token of a block in slots [used - T, used) sees -> bool [B, T, L]: every real slot before the
    block (valid bool [B, L]) and, within it, tree[b, t, j] (bool [B, T, T]: token t sees block token j) or, with
    no tree, the tokens up to its own (a chain). used: an int or a tensor [] (inside CUDA graphs)."""
    B, L = valid.shape
    j = torch.arange(L, device=valid.device) - (used - T)  # [L]: each slot's index in the block, < 0 before it
    if tree is None:
        mine = j[None, :] <= torch.arange(T, device=valid.device)[:, None]  # [T, L]
    else:
        mine = tree.gather(2, j.clamp(0, T - 1).expand(B, T, L))  # [B, T, L]
    return valid[:, None, :] & ((j < 0) | (mine & (j < T)))


def ancestors(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A verify tree's mask and depths from its parents, on their device: parents long [B, T] (each block row's
    parent row, before it; -1 for the root) -> (tree bool [B, T, T]: row t sees itself and its ancestors, as
    `block_mask` takes it; depth long [B, T]: each row's ancestors, the root's 0). Built on the device, a CUDA
    graph builds the tree itself: a verify then needs no [T, T] mask from the host, where building it row by row
    is host time the GPU waits for. The Triton kernel on a GPU for T <= MAX_ROWS, `ancestors_reference` elsewhere."""
    if triton is None or not parents.is_cuda or parents.shape[1] > MAX_ROWS:
        return ancestors_reference(parents)
    return triton_ancestors(parents)


def _rounds(T: int) -> int:
    """Squarings of the "itself or its parent" relation that reach every ancestor in a T-row tree."""
    return (T - 1).bit_length()  # 2**rounds >= T - 1, the deepest a T-row tree goes


def ancestors_reference(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ancestors` with torch ops (any device): the closure by repeated squaring, in fp32 (exact for 0/1)."""
    T = parents.shape[1]
    t = torch.arange(T, device=parents.device)
    closure = ((t[:, None] == t) | (parents[..., None] == t)).float()  # itself and its parent, [B, T, T]
    for _ in range(_rounds(T)):
        closure = (closure @ closure).clamp_(max=1)
    return closure > 0, closure.sum(-1).long() - 1


def triton_ancestors(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ancestors` in one Triton program per row of the batch (T <= MAX_ROWS; also in Triton's interpreter)."""
    B, T = parents.shape
    tree = torch.empty(B, T, T, dtype=torch.bool, device=parents.device)
    depth = torch.empty(B, T, dtype=torch.long, device=parents.device)
    block = max(16, triton.next_power_of_2(T))  # a tensor-core product takes 16 rows at least
    _ancestors_kernel[(B,)](parents.contiguous(), tree.view(torch.int8), depth, T, ROUNDS=_rounds(T), BLOCK=block)
    return tree, depth


def split_kv_reference(q, k, v, valid, used, tree=None) -> torch.Tensor:
    """The chunked algorithm with torch ops (any device). Shapes as `split_kv_attention`."""
    B, H, T, D = q.shape
    L = k.shape[2]
    if k.shape[1] != H:  # grouped-query attention: each K/V head serves H // H_kv query heads
        k, v = (t.repeat_interleave(H // k.shape[1], dim=1) for t in (k, v))
    chunk, S = _chunks(L)
    pad = S * chunk - L
    sees = valid[:, None] if T == 1 else block_mask(valid, used, T, tree)  # [B, T or 1, L]
    ok = sees & (torch.arange(L, device=q.device) < used)
    ok = torch.nn.functional.pad(ok, (0, pad)).view(B, 1, -1, S, chunk)
    kk = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, H, S, chunk, D)
    vv = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(B, H, S, chunk, D)
    scores = torch.einsum("bhtd,bhscd->bhtsc", q.float() * D**-0.5, kk).masked_fill(~ok, NEG)  # [B, H, T, S, chunk]
    peak = scores.amax(-1).clamp(min=NEG)
    p = torch.exp(scores - peak[..., None]) * ok
    out = torch.einsum("bhtsc,bhscd->bhtsd", p, vv)
    return merge(out, peak, p.sum(-1)).to(q.dtype)


def split_kv_attention(q, k, v, valid, used, tree=None) -> torch.Tensor:
    """q [B, H, T, D] (T <= MAX_ROWS), k/v [B, H_kv, L, D] (the whole cache), valid bool [B, L] (the real slots),
    used long [] on the device (slots in use: the new tokens' are the last T), tree bool [B, T, T] or None (a
    chain): see `block_mask` -> [B, H, T, D] in q's dtype. The Triton kernels on a GPU, `split_kv_reference`
    elsewhere."""
    if triton is None or not q.is_cuda:
        return split_kv_reference(q, k, v, valid, used, tree)
    if q.shape[2] > 1:
        return triton_split_kv_block(q, k, v, valid, used, tree)
    return triton_split_kv(q, k, v, valid, used)


def triton_split_kv(q, k, v, valid, used, splits: int = SPLITS, block_n: int = BLOCK_N,
                    num_warps: int = NUM_WARPS) -> torch.Tensor:  # fmt: skip
    """`split_kv_attention` through the Triton kernel (also in Triton's interpreter, for the tests); the launch
    settings are `benchmarks/split_kv.py`'s to sweep."""
    B, H, _, D = q.shape
    H_kv, L = k.shape[1], k.shape[2]
    chunk, S = _chunks(L, splits, block_n)
    out = torch.empty(B, H, S, D, device=q.device, dtype=torch.float32)
    peak = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    total = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    used = used.reshape(1).to(device=q.device, dtype=torch.int32)
    _split_kv_kernel[(B * H, S)](
        q, k, v, valid, used, out, peak, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        valid.stride(0), H, H // H_kv, chunk, D**-0.5, D=D, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    # `merge` in one kernel: in torch ops it is about ten launches in every layer of a step that is not compiled
    return launch_merge(out[:, :, None], peak[:, :, None], total[:, :, None], q.dtype)


def block_launch(T: int) -> tuple[int, int, int, int]:
    """(block_m, num_warps, splits, num_stages) for a block of T queries: `BLOCK_LAUNCH`'s row for its size."""
    return next(launch for most, *launch in BLOCK_LAUNCH if most >= T)


def triton_split_kv_block(q, k, v, valid, used, tree=None, splits: int | None = None, block_n: int = BLOCK_N,
                          block_m: int | None = None, num_warps: int | None = None,
                          num_stages: int | None = None) -> torch.Tensor:  # fmt: skip
    """`split_kv_attention` of a block (T <= MAX_ROWS) through the Triton kernel; launch settings not given are
    `block_launch`'s."""
    B, H, T, D = q.shape
    H_kv, L = k.shape[1], k.shape[2]
    rule = block_launch(T)
    block_m, num_warps = block_m or rule[0], num_warps or rule[1]
    splits, num_stages = splits or rule[2], num_stages or rule[3]
    chunk, S = _chunks(L, splits, block_n)
    q, valid = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, valid))
    causal = tree is None
    if causal:
        tree = valid  # not read: the chain's mask is computed in the kernel
    elif tree.stride(-1) != 1:
        tree = tree.contiguous()
    out = torch.empty(B, H, T, S, D, device=q.device, dtype=torch.float32)
    peak = torch.empty(B, H, T, S, device=q.device, dtype=torch.float32)
    total = torch.empty(B, H, T, S, device=q.device, dtype=torch.float32)
    used = used.reshape(1).to(device=q.device, dtype=torch.int32)
    # fp32 products in full precision (the mini models run in fp32); bf16 ones are exact in any mode
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # the query tiles vary fastest: the programs that read one chunk of one head run side by side (its K/V in L2)
    _split_kv_block_kernel[(triton.cdiv(T, block_m), B * H, S)](
        q, k, v, valid, tree, used, out, peak, total,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), valid.stride(0), tree.stride(0), tree.stride(1), T, H, H // H_kv, chunk, S, D**-0.5,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, CAUSAL=causal, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return launch_merge(out, peak, total, q.dtype)


def launch_merge(out, peak, total, dtype: torch.dtype) -> torch.Tensor:
    """`merge` on the GPU: out [B, H, T, S, D], peak and total [B, H, T, S] (contiguous) -> [B, H, T, D] in dtype.
    Several rows a program: a program per row spends more time starting than merging (a 65-token block has 2,080
    rows of 4 chunks). A block's result lies in memory as [B, T, H, D], so the layer's output projection reads it
    as [B, T, H * D] without a copy (for one token that is [B, H, 1, D] as it is)."""
    B, H, T, S, D = out.shape
    o = torch.empty(B, T, H, D, device=out.device, dtype=dtype)
    splits = triton.next_power_of_2(S)
    rows = max(1, MERGE_TILE // splits)
    _merge_kernel[(triton.cdiv(B * H * T, rows),)](out, peak, total, o, B * H * T, S, H, T, D=D, SPLITS=splits,
                                                   ROWS=rows)  # fmt: skip
    return o.transpose(1, 2) if T > 1 else o.view(B, H, 1, D)


if triton is not None:

    @triton.jit
    def _split_kv_kernel(Q, K, V, VALID, USED, OUT, PEAK, TOTAL, sqb, sqh, skb, skh, skl, svb, svh, svl, svalid,
                         H, G, CHUNK, scale, D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """One program: query head h of row b against slots [s * CHUNK, (s + 1) * CHUNK) below USED."""
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // H
        h = bh % H
        kh = h // G
        d = tl.arange(0, D)
        # fp32 throughout: inductor hands `scale` over as a double, which would widen the loop's running max
        q = (tl.load(Q + b * sqb + h * sqh + d).to(tl.float32) * scale).to(tl.float32)
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, tl.load(USED))
        m = tl.full([1], -1.0e30, tl.float32)  # NEG
        total = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            inside = n < hi
            ok = inside & (tl.load(VALID + b * svalid + n, mask=inside, other=0) != 0)
            kb = tl.load(K + b * skb + kh * skh + n[:, None] * skl + d[None, :], mask=inside[:, None], other=0.0)
            score = tl.sum(kb.to(tl.float32) * q[None, :], axis=1)
            score = tl.where(ok, score, -1.0e30)
            m_new = tl.maximum(m, tl.max(score, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.where(ok, tl.exp(score - m_new), 0.0)
            vb = tl.load(V + b * svb + kh * svh + n[:, None] * svl + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * vb.to(tl.float32), axis=0)
            total = total * alpha + tl.sum(p, axis=0)
            m = m_new
        row = bh * tl.num_programs(1) + s
        tl.store(OUT + row * D + d, acc)
        tl.store(PEAK + row + tl.arange(0, 1), m)
        tl.store(TOTAL + row + tl.arange(0, 1), total)

    @triton.jit
    def _block_tile(start, hi, first, q, m, total, acc, Kp, Vp, VALIDp, TREEp, t, rows, skl, svl, stt, scale,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, IN_BLOCK: tl.constexpr,
                    CAUSAL: tl.constexpr):  # fmt: skip
        """Flash attention's step over slots [start, start + BLOCK_N) below `hi`, in log2 units (scale includes
        log2(e)). IN_BLOCK: some of them are the block's own (from slot `first`), seen per query."""
        n = start + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        inside = n < hi
        ok = (tl.load(VALIDp + n, mask=inside, other=0) != 0)[None, :]  # the real slots, one row for every query
        if IN_BLOCK:
            j = n - first  # the slot's index in the block, < 0 before it
            if CAUSAL:
                mine = j[None, :] <= t[:, None]
            else:
                mine = tl.load(TREEp + t[:, None] * stt + j[None, :],
                               mask=rows[:, None] & ((j >= 0) & inside)[None, :], other=0) != 0  # fmt: skip
            ok = ok & ((j < 0)[None, :] | mine)
        kb = tl.load(Kp + n[:, None] * skl + d[None, :], mask=inside[:, None], other=0.0)
        # fp32: inductor hands `scale` over as a double, which would widen the loop's running max
        score = (tl.dot(q, tl.trans(kb), input_precision=PRECISION) * scale).to(tl.float32)
        score = tl.where(ok, score, -1.0e30)
        m_new = tl.maximum(m, tl.max(score, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.where(ok, tl.exp2(score - m_new[:, None]), 0.0)
        vb = tl.load(Vp + n[:, None] * svl + d[None, :], mask=inside[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        total = total * alpha + tl.sum(p, axis=1)
        return m_new, total, acc

    @triton.jit
    def _split_kv_block_kernel(Q, K, V, VALID, TREE, USED, OUT, PEAK, TOTAL, sqb, sqh, sqt, skb, skh, skl, svb, svh,
                               svl, svalid, stb, stt, T, H, G, CHUNK, S, scale, D: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                               CAUSAL: tl.constexpr):  # fmt: skip
        """One program: queries [r * BLOCK_M, (r + 1) * BLOCK_M) of head h of row b (a block in the last T used
        slots) against the slots of chunk s below USED that each sees (flash attention's loop over one chunk)."""
        r = tl.program_id(0)
        bh = tl.program_id(1)
        s = tl.program_id(2)
        b = bh // H
        h = bh % H
        kh = h // G
        d = tl.arange(0, D)
        t = r * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = t < T
        q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + d[None, :], mask=rows[:, None], other=0.0)
        used = tl.load(USED)
        first = used - T
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, used)
        # the iterations wholly before the block, then the rest (which may reach into it)
        mid = lo + tl.maximum(tl.minimum(hi, first) - lo, 0) // BLOCK_N * BLOCK_N
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)  # NEG
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        Kp, Vp = K + b * skb + kh * skh, V + b * svb + kh * svh
        VALIDp, TREEp = VALID + b * svalid, TREE + b * stb
        scale2 = scale * 1.4426950408889634  # log2(e): exp2 is the GPU's own instruction
        for start in range(lo, mid, BLOCK_N):
            m, total, acc = _block_tile(start, hi, first, q, m, total, acc, Kp, Vp, VALIDp, TREEp, t, rows, skl, svl,
                                        stt, scale2, D, BLOCK_N, PRECISION, False, CAUSAL)  # fmt: skip
        for start in range(mid, hi, BLOCK_N):
            m, total, acc = _block_tile(start, hi, first, q, m, total, acc, Kp, Vp, VALIDp, TREEp, t, rows, skl, svl,
                                        stt, scale2, D, BLOCK_N, PRECISION, True, CAUSAL)  # fmt: skip
        row = (bh * T + t) * S + s  # the merge's layout: [B, H, T, S]
        tl.store(OUT + row[:, None] * D + d[None, :], acc, mask=rows[:, None])
        tl.store(PEAK + row, m * 0.6931471805599453, mask=rows)  # back to natural-log units: ln(2)
        tl.store(TOTAL + row, total, mask=rows)

    @triton.jit
    def _ancestors_kernel(PARENTS, TREE, DEPTH, T, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
        """`ancestors` of batch row b: the [T, T] closure in one tile, squared ROUNDS times on the tensor cores
        (0/1 entries in fp16, sums of at most BLOCK of them in fp32: exact)."""
        b = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        real = i < T
        parent = tl.load(PARENTS + b * T + i, mask=real, other=-1)
        closure = ((i[:, None] == i[None, :]) | (parent[:, None] == i[None, :])) & real[:, None]
        closure = closure.to(tl.float16)
        for _ in tl.static_range(ROUNDS):
            closure = tl.minimum(tl.dot(closure, closure), 1.0).to(tl.float16)
        both = real[:, None] & real[None, :]
        tl.store(TREE + b * T * T + i[:, None] * T + i[None, :], (closure > 0).to(tl.int8), mask=both)
        tl.store(DEPTH + b * T + i, tl.sum(closure.to(tl.int64), axis=1) - 1, mask=real)

    @triton.jit
    def _merge_kernel(OUT, PEAK, TOTAL, O, N, S, H, T, D: tl.constexpr, SPLITS: tl.constexpr,
                      ROWS: tl.constexpr):  # fmt: skip
        """`merge` for ROWS of the N (row, head, query) rows: their S chunks' partials -> O [B, T, H, D] in O's
        dtype."""
        i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (b * H + h) * T + t
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        real = i < N
        here = real[:, None] & (s < S)[None, :]  # [ROWS, SPLITS]
        at = i[:, None] * S + s[None, :]
        peak = tl.load(PEAK + at, mask=here, other=-1.0e30)
        total = tl.load(TOTAL + at, mask=here, other=0.0)
        out = tl.load(OUT + at[:, :, None] * D + d[None, None, :], mask=here[:, :, None], other=0.0)
        w = tl.where(total > 0, tl.exp(peak - tl.max(peak, axis=1)[:, None]), 0.0)  # an empty chunk weighs nothing
        o = tl.sum(w[:, :, None] * out, axis=1) / tl.sum(w * total, axis=1)[:, None]
        t = i % T
        h = (i // T) % H
        b = i // (T * H)
        dst = ((b * T + t) * H + h) * D
        tl.store(O + dst[:, None] + d[None, :], o.to(O.dtype.element_ty), mask=real[:, None])
