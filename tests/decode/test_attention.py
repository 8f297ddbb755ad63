"""Split-KV attention of new tokens (`decode.attention`): the chunked algorithm is SDPA's attention over the used,
real slots (grouped-query heads, padding, any length; for a block, each token's own slots), and the Triton kernels
compute it too (in Triton's interpreter on the CPU when Triton is installed; on the GPU in test_engine_gpu.py)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from specalign.decode.attention import ancestors_reference, split_kv_reference

# (rows, heads, kv heads, cache slots, head dim, slots in use)
SHAPES = [(1, 4, 4, 300, 16, 137), (2, 8, 2, 1030, 32, 1030), (3, 4, 4, 64, 16, 1), (1, 2, 1, 4096, 8, 4000)]


def _case(B, H, H_kv, L, D, used, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=g) for h, t in ((H, 1), (H_kv, L), (H_kv, L)))
    valid = torch.rand(B, L, generator=g) > 0.2  # left padding and stale slots alike: masked
    valid[:, used - 1] = True  # the new token's own slot
    mask = (valid & (torch.arange(L) < used))[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H_kv < H)
    return (q, k, v, valid, torch.tensor(used), None), want


# blocks: (rows, heads, kv heads, cache slots, head dim, slots in use, new tokens); a tree when the last is odd
BLOCKS = [(1, 4, 4, 300, 16, 140, 2), (2, 8, 2, 1030, 32, 1030, 17), (1, 2, 2, 200, 16, 65, 65)]


def _block(B, H, H_kv, L, D, used, T, seed=0):
    """A chain (causal over the last T slots) or, for odd T, a tree (each token sees a random set of the block's
    earlier slots, as its ancestors); both see the real slots before the block."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=g) for h, t in ((H, T), (H_kv, L), (H_kv, L)))
    slots = torch.arange(L)
    first = used - T
    valid = torch.rand(B, L, generator=g) > 0.2
    valid[:, first:used] = True
    sees = (slots[None, :] <= (first + torch.arange(T))[:, None]) & valid[:, None, :]  # [B, T, L]
    tree = None
    if T % 2:
        tree = (torch.rand(B, T, T, generator=g) > 0.5).tril(-1) | torch.eye(T, dtype=torch.bool)
        sees[:, :, first:used] &= tree
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=sees[:, None], enable_gqa=H_kv < H)
    return (q, k, v, valid, torch.tensor(used), tree), want


@pytest.mark.parametrize(("make", "shape"), [(_case, s) for s in SHAPES] + [(_block, s) for s in BLOCKS])
def test_split_kv_reference_is_sdpa_over_the_used_slots(make, shape):
    """One token over the real slots below `used`; a block's tokens each over its own mask's slots."""
    args, want = make(*shape)
    got = split_kv_reference(*args)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    q, k, v, valid, used, tree = args
    k[:, :, int(used) :] = 1e4  # what lies past `used` is never read into the result
    torch.testing.assert_close(split_kv_reference(q, k, v, valid, used, tree), want, atol=1e-5, rtol=1e-5)


def _tree(B: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random trees of T rows (each row's parent an earlier row, the root's -1) -> (parents long [B, T], and by
    walking each row's parent chain: the ancestor mask bool [B, T, T], the depths long [B, T])."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.stack([torch.cat([torch.tensor([-1]), (torch.rand(T - 1, generator=g) * torch.arange(1, T)).long()])
                           for _ in range(B)])  # fmt: skip
    parents[-1] = torch.arange(-1, T - 1)  # the last row a chain: the deepest tree
    tree = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            node = t
            while node >= 0:
                tree[b, t, node] = True
                node = int(parents[b, node])
    return parents, tree, tree.sum(-1) - 1


TREES = [(1, 1), (2, 2), (3, 17), (2, 65), (2, 128), (2, 200)]


@pytest.mark.parametrize("shape", TREES)
def test_ancestors_are_each_rows_parent_chain(shape):
    parents, tree, depth = _tree(*shape)
    got_tree, got_depth = ancestors_reference(parents)
    assert torch.equal(got_tree, tree) and torch.equal(got_depth, depth)


INTERPRETED = """
import torch
from specalign.decode.attention import split_kv_reference, triton_ancestors, triton_split_kv, triton_split_kv_block
from tests.decode.test_attention import BLOCKS, SHAPES, TREES, _block, _case, _tree
for shape in TREES[:-1]:  # up to MAX_ROWS
    parents, tree, depth = _tree(*shape)
    got_tree, got_depth = triton_ancestors(parents)
    assert torch.equal(got_tree, tree) and torch.equal(got_depth, depth), shape
for shape in SHAPES[:3]:
    args, want = _case(*shape)
    torch.testing.assert_close(triton_split_kv(*args[:5]), split_kv_reference(*args), atol=1e-5, rtol=1e-5)
for shape in BLOCKS:
    args, want = _block(*shape)
    torch.testing.assert_close(triton_split_kv_block(*args), want, atol=1e-5, rtol=1e-5)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_match_the_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when the kernel is defined: a fresh process
    r = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
