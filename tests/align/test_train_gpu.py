"""TokenAdapter training on the GPU (run on the GPU machine: pytest -m gpu): the compiled step trains the same."""

import pytest
import torch

from specalign.align.tokens import TokenPairs, write_pairs
from specalign.align.train import AdapterTrainConfig, train_adapter

pytestmark = pytest.mark.gpu


def test_compiled_training_matches_eager_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(0)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(99, generator=g) + 1])
    for name, n in (("train", 640), ("test", 64)):
        draft = torch.randint(1, 100, (n, 12), generator=g)
        target = torch.cat([torch.ones(n, 1, dtype=torch.long), perm[draft[:, :-1]]], 1)
        write_pairs(TokenPairs(draft=draft.tolist(), target=target.tolist(), vocab_size=100), tmp_path / name)
    runs = {}
    for compiled in (False, True):
        cfg = AdapterTrainConfig(train=str(tmp_path / "train"), test=str(tmp_path / "test"), epochs=6,
                                 batch_size=64, lr=2e-3, warmup_steps=5, early_stopping=999, embed_dim=64,
                                 num_layers=1, num_heads=2, ffn_dim=128, dropout=0.0, device="cuda",
                                 compile=compiled, out=str(tmp_path / f"task{compiled}"))  # fmt: skip
        runs[compiled] = train_adapter(cfg)["history"]
    assert runs[True][-1]["top1"] > 0.9
    for a, b in zip(runs[False], runs[True], strict=True):  # bf16 rounding differs between the two kernels
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)
