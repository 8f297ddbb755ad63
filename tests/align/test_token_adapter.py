"""TokenAdapter: the reference's size, causality, learnability, and safe loading of ours and the reference's files."""

import pytest
import torch

from specalign.align import TokenAdapter, TokenAdapterConfig, load_adapter, save_adapter
from specalign.align.token_adapter import adapter_loss, count_parameters, shifted_targets, topk_accuracy
from specalign.errors import SpecalignError

TINY = dict(vocab_size=50, embed_dim=32, num_layers=2, num_heads=4, ffn_dim=64, max_positions=16)


def tiny(**kw) -> TokenAdapter:
    torch.manual_seed(0)
    return TokenAdapter(TokenAdapterConfig(**{**TINY, **kw})).eval()


def test_default_has_the_reference_parameter_count():
    with torch.device("meta"):
        n = count_parameters(TokenAdapter(TokenAdapterConfig()))
        nb = count_parameters(TokenAdapter(TokenAdapterConfig(token_bias=True)))
    assert n == 45_486_346
    cfg = TokenAdapterConfig(token_bias=True)
    assert cfg.max_positions == 64 and TokenAdapterConfig().max_positions == 128
    assert nb == n + cfg.vocab_size - (128 - 64) * cfg.embed_dim


def test_causal_later_tokens_do_not_change_earlier_logits():
    adapter = tiny()
    x = torch.randint(1, 50, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 49 + 1
    with torch.no_grad():
        a, b = adapter(x), adapter(y)
        masked = adapter(x, attention_mask=torch.ones_like(x))
    assert a.shape == (2, 12, 50)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    torch.testing.assert_close(a, masked)


def test_left_padding_mask_gives_finite_logits_and_ignores_pads():
    adapter = tiny()
    x = torch.randint(1, 50, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = (padded != 0).long()
    with torch.no_grad():
        out = adapter(padded, attention_mask=mask)
    assert torch.isfinite(out).all()


def test_shifted_targets_follow_training_alignment():
    draft = torch.tensor([[5, 6, 7, 8]])
    target = torch.tensor([[1, 2, 3]])
    assert shifted_targets(draft, target).tolist() == [[2, 3, 0, 0]]  # logits[i] predict target[i+1]


def test_tiny_adapter_learns_a_synthetic_mapping():
    torch.manual_seed(0)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(49) + 1])  # f over ids 1..49, pad stays pad

    def batch(n=64, s=12):
        draft = torch.randint(1, 50, (n, s))
        target = torch.cat([torch.randint(1, 50, (n, 1)), perm[draft[:, :-1]]], 1)  # target[i+1] = f(draft[i])
        return draft, target

    adapter = TokenAdapter(TokenAdapterConfig(**{**TINY, "embed_dim": 64, "num_layers": 1, "dropout": 0.0}))
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(250):
        draft, target = batch()
        loss = adapter_loss(adapter(draft), draft, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter.eval()
    draft, target = batch(256)
    with torch.no_grad():
        acc = topk_accuracy(adapter(draft), draft, target)
    assert acc > 0.95, acc


def test_save_load_roundtrip_identical_logits(tmp_path):
    adapter = tiny(token_bias=True)
    with torch.no_grad():
        adapter.token_bias.normal_()
    x = torch.randint(1, 50, (2, 10))
    save_adapter(adapter, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["config.json", "model.safetensors"]
    for src in (tmp_path / "adapter", tmp_path / "adapter" / "model.safetensors"):
        loaded = load_adapter(src)
        assert loaded.config == adapter.config
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), adapter(x), rtol=0, atol=0)


def test_reference_style_pt_loads_with_shapes_inferred(tmp_path):
    adapter = tiny()
    pt = tmp_path / "best_model.pt"
    torch.save({"model_state_dict": adapter.state_dict(), "epoch": 3}, pt)
    loaded = load_adapter(pt)  # no config stored: sizes from the shapes, num_heads from `args` or the default
    assert (loaded.config.vocab_size, loaded.config.embed_dim, loaded.config.num_layers) == (50, 32, 2)
    assert (loaded.config.max_positions, loaded.config.ffn_dim, loaded.config.token_bias) == (16, 64, False)
    x = torch.randint(1, 50, (1, 8))
    # heads do not change the parameter shapes; compare against an adapter with the inferred default of 8
    ref = TokenAdapter(TokenAdapterConfig(**{**TINY, "num_heads": 8})).eval()
    ref.load_state_dict(adapter.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), rtol=0, atol=0)


def test_reference_pt_with_renamed_keys_and_args(tmp_path):
    import argparse

    adapter = tiny()
    renames = {"embedding": "token_embedding", "pos_embedding": "position_embedding", "head": "output"}
    sd = {}
    for k, v in adapter.state_dict().items():
        top, _, rest = k.partition(".")
        sd[f"module.{renames.get(top, top)}.{rest}"] = v
    pt = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": sd, "args": argparse.Namespace(nhead=4, lr=1e-4), "epoch": 3}, pt)
    loaded = load_adapter(pt)
    assert loaded.config.num_heads == 4
    x = torch.randint(1, 50, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), adapter(x), rtol=0, atol=0)


def _one_line(err, path):
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_wrong_size_checkpoint_names_file_and_key(tmp_path):
    pt = tmp_path / "other.pt"
    sd = tiny().state_dict()
    sd["transformer.layers.0.linear1.weight"] = torch.zeros(128, 32)  # inconsistent with layer 1
    torch.save({"model_state_dict": sd}, pt)
    with pytest.raises(SpecalignError) as err:
        load_adapter(pt)
    assert "transformer.layers.0.linear1.bias" in _one_line(err, pt)

    pt2 = tmp_path / "extra.pt"
    torch.save({"model_state_dict": {**tiny().state_dict(), "extra.weight": torch.zeros(2)}}, pt2)
    with pytest.raises(SpecalignError) as err:
        load_adapter(pt2)
    assert "extra.weight" in _one_line(err, pt2)

    d = save_adapter(tiny(), tmp_path / "small")
    with pytest.raises(SpecalignError) as err:
        load_adapter(d, config=TokenAdapterConfig(**{**TINY, "vocab_size": 60}))
    assert "embedding.weight" in _one_line(err, d)


def test_truncated_files_fail_cleanly(tmp_path):
    pt = tmp_path / "cut.pt"
    torch.save({"model_state_dict": tiny().state_dict()}, pt)
    pt.write_bytes(pt.read_bytes()[:300])
    with pytest.raises(SpecalignError) as err:
        load_adapter(pt)
    _one_line(err, pt)

    d = save_adapter(tiny(), tmp_path / "cut")
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:500])
    with pytest.raises(SpecalignError) as err:
        load_adapter(d)
    _one_line(err, st)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    pt = tmp_path / "evil.pt"
    torch.save({"model_state_dict": tiny().state_dict(), "hook": print}, pt)
    with pytest.raises(SpecalignError) as err:
        load_adapter(pt)
    _one_line(err, pt)


def test_bad_tokens_and_long_sequences_fail_with_the_checkpoint_path(tmp_path):
    d = save_adapter(tiny(), tmp_path / "a")
    adapter = load_adapter(d)
    with pytest.raises(SpecalignError) as err:
        adapter(torch.tensor([[1, 2, 50]]))
    assert "50" in _one_line(err, d)
    with pytest.raises(SpecalignError) as err:
        adapter(torch.ones(1, 17, dtype=torch.long))
    assert "max_positions" in _one_line(err, d)
