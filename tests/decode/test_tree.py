"""Tree verification: every node of a draft tree gets, in one forward, the logits it would get on its own path;
keeping the accepted path leaves the cache as if only that path had been fed; greedy SD with trees is
token-identical to the target alone, right, wrong or half-right."""

import random

import pytest
import torch
from random_models import random_vlm

from specalign.data import open_dataset
from specalign.decode.engine import Engine, decode_one_token, prefill, prompt_embeds
from specalign.decode.speculative import (
    Proposal,
    accept_tree,
    speculative_decode,
    target_generate,
    tree_depths,
    verify_tree,
)
from specalign.errors import SpecalignError
from specalign.models.base import Sampling


@pytest.fixture(scope="module")
def target(small_world):
    return random_vlm("target", small_world, 3)


@pytest.fixture(scope="module")
def prompts(small_world, target):
    ds = open_dataset(small_world / "my_egpt_dsec_seq_1s")
    return [prompt_embeds(target, target.collate([target.prepare(ds[i], "Describe the road.")]))[0] for i in range(3)]


def random_tree(rng: random.Random, nodes: int, vocab: int) -> Proposal:
    parents = []
    for i in range(nodes):
        parents.append(rng.randrange(-1, i))
    return Proposal([rng.randrange(vocab) for _ in range(nodes)], parents=parents)


@pytest.mark.parametrize("attention", ["sdpa", "split"])
def test_tree_logits_equal_each_path_fed_alone(target, prompts, attention):
    engine = Engine(target, 400, attention=attention)
    rng = random.Random(0)
    tree = random_tree(rng, 12, target.vocab_size)
    prefill(engine, prompts[0])
    decode_one_token(engine, torch.tensor([5]))  # some answer already in the cache
    start = engine.length
    logits = verify_tree(engine, 7, tree)  # [13, V]
    for i in range(len(tree.tokens)):
        path, node = [], i
        while node >= 0:
            path.append(tree.tokens[node])
            node = tree.parents[node]
        engine.rollback(start)
        alone = engine.run(torch.tensor([[7, *reversed(path)]]))[0, -1]
        # split-KV sums each token's chunks in matmuls of the block's shape: equal up to fp32 rounding
        tol = 1e-9 if attention == "sdpa" else 1e-5
        torch.testing.assert_close(logits[i + 1], alone, rtol=tol, atol=tol)
    if attention == "split":  # and what SDPA computes
        sdpa = Engine(target, 400)
        prefill(sdpa, prompts[0])
        decode_one_token(sdpa, torch.tensor([5]))
        torch.testing.assert_close(verify_tree(sdpa, 7, tree), logits, rtol=1e-5, atol=1e-5)


def test_keep_leaves_the_cache_as_if_only_the_path_was_fed(target, prompts):
    a, b = Engine(target, 400), Engine(target, 400)
    tree = Proposal([11, 12, 13, 14, 15, 16], parents=[-1, -1, 0, 1, 3, 2])  # path: 12 -> 14 -> 15 (nodes 1, 3, 4)
    for e in (a, b):
        prefill(e, prompts[1])
    start = a.length
    verify_tree(a, 9, tree)
    a.keep(start, torch.tensor([0, 2, 4, 5]))  # block rows: the root and nodes 1, 3, 4
    b.run(torch.tensor([[9, 12, 14, 15]]))
    assert a.length == b.length and torch.equal(a.count, b.count)
    torch.testing.assert_close(decode_one_token(a, torch.tensor([3])), decode_one_token(b, torch.tensor([3])))


def test_accept_tree_walks_the_target_argmax():
    tree = Proposal([4, 5, 6, 7], parents=[-1, -1, 1, 1])
    logits = torch.full((5, 10), -1.0)
    for row, best in enumerate([5, 0, 7, 0, 0]):  # root wants 5 (node 1); node 1 wants 7 (node 3); node 3 wants 0
        logits[row, best] = 1.0
    assert accept_tree(tree, logits) == ([1, 3], 0)
    assert tree_depths(tree.parents) == [1, 1, 2, 2] and tree.depth == 2


class TreeOracle:
    """Trees around the target's own answer: at each depth the right token and a wrong sibling, in shuffled order,
    each wrong node with a wrong child (so paths fork and rejected branches have depth)."""

    name = "tree-oracle"
    device = torch.device("cpu")

    def __init__(self, answer: list[int], vocab: int, depth: int, right: bool = True, seed: int = 0):
        self.answer, self.vocab, self.depth, self.right = answer, vocab, depth, right
        self.rng = random.Random(seed)

    def start(self, stats):
        pass

    def predraft(self, k, stats):
        return Proposal([])

    def propose(self, accepted, gamma, stats):
        tokens, parents, node = [], [], -1
        for d in range(min(gamma, self.depth)):
            n = len(accepted) + d
            good = self.answer[n] if n < len(self.answer) and self.right else self.rng.randrange(self.vocab)
            bad = (good + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
            pair = [good, bad]
            self.rng.shuffle(pair)
            for t in pair:
                tokens.append(t)
                parents.append(node)
            wrong = len(tokens) - 2 + pair.index(bad)
            tokens.append((bad + 3) % self.vocab)
            parents.append(wrong)
            node = len(tokens) - 3 + pair.index(good)
        return Proposal(tokens, parents=parents)


@pytest.mark.parametrize("right", [True, False])
def test_greedy_tree_sd_is_token_identical(target, prompts, right):
    t_engine = Engine(target, 500)
    eos = target.eos_token_id
    for i, te in enumerate(prompts):
        ref, _ = target_generate(t_engine, te, 40, eos)
        out, stats = speculative_decode(t_engine, te, TreeOracle(ref, target.vocab_size, 5, right, seed=i), 5, 40, eos)
        assert out == ref
        assert stats.nodes_per_round and max(stats.nodes_per_round) == 15
        if right:
            assert stats.tau > 4, "a tree holding the answer's path is accepted to its depth"
        else:
            assert stats.accepted <= 2


def test_trees_refuse_sampling(target, prompts):
    t_engine = Engine(target, 500)
    with pytest.raises(SpecalignError, match="greedy only"):
        speculative_decode(t_engine, prompts[0], TreeOracle([1] * 40, target.vocab_size, 3), 3, 10,
                           target.eos_token_id, Sampling(temperature=1.0, seed=0), torch.Generator())  # fmt: skip
