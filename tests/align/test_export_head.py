"""`export-head`: an eagle-1 head written in the public EAGLE-1 layout (vLLM `EagleLlamaForCausalLM`, SGLang
`LlamaForCausalLMEagle`), checked against that layout's names, shapes, dtypes and math, and read back bit for bit."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from specalign.align.export_head import ExportConfig, export_head, import_head
from specalign.align.heads import DraftHead, HeadConfig, attach_parts, save_head
from specalign.align.train_head import HeadTrainConfig
from specalign.cli import main
from specalign.errors import SpecalignError

D, HEADS, KV, HD, FFN, VOCAB = 64, 4, 2, 16, 96, 99
# the public EAGLE-1 layout for a Llama target: (name, shape); no embeddings, no LM head, no norm but the layer's
# post-attention one
LAYOUT = {
    "fc.weight": [D, 2 * D],
    "layers.0.self_attn.q_proj.weight": [HEADS * HD, D],
    "layers.0.self_attn.k_proj.weight": [KV * HD, D],
    "layers.0.self_attn.v_proj.weight": [KV * HD, D],
    "layers.0.self_attn.o_proj.weight": [D, HEADS * HD],
    "layers.0.mlp.gate_proj.weight": [FFN, D],
    "layers.0.mlp.up_proj.weight": [FFN, D],
    "layers.0.mlp.down_proj.weight": [D, FFN],
    "layers.0.post_attention_layernorm.weight": [D],
}


def head_config(layout="eagle-1", **kw) -> HeadConfig:
    return HeadConfig(kind="eagle", hidden_size=D, vocab_size=VOCAB, feature_size=D, num_attention_heads=HEADS,
                      num_key_value_heads=KV, head_dim=HD, intermediate_size=FFN, rope_theta=5e5, layout=layout,
                      target={"name": "tiny-target", "hidden_size": D, "vocab_size": VOCAB}, **kw)  # fmt: skip


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    head = DraftHead(head_config())
    with torch.no_grad():  # a trained head's norm weight is not all ones
        head.layers[0].post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return head, save_head(tmp_path / "head" / "best_model", head.to(torch.bfloat16))


def test_vllm_layout_names_shapes_dtypes_and_config(trained, tmp_path):
    head, path = trained
    r = export_head(ExportConfig(head=str(path.parent), out=str(tmp_path / "vllm")))
    assert r["engine"] == "vllm" and r["dtype"] == "bfloat16" and r["tensors"] == len(LAYOUT)
    state = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    assert {k: list(v.shape) for k, v in state.items()} == LAYOUT
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["bias"], cfg["tie_word_embeddings"], cfg["torch_dtype"]) == (
        1, False, False, "bfloat16")  # fmt: skip
    llama = LlamaConfig.from_pretrained(tmp_path / "vllm")  # what both engines parse it with
    assert (llama.hidden_size, llama.vocab_size, llama.num_attention_heads, llama.num_key_value_heads) == (
        D, VOCAB, HEADS, KV)  # fmt: skip
    assert (llama.head_dim, llama.intermediate_size, llama.rope_parameters["rope_theta"]) == (HD, FFN, 5e5)
    back = import_head(tmp_path / "vllm")
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.head_config == head.head_config


def test_sglang_layout_adds_a_zero_fc_bias(trained, tmp_path):
    head, path = trained
    export_head(ExportConfig(head=str(path), out=str(tmp_path / "sg"), engine="sglang", dtype="fp16"))
    state = load_file(str(tmp_path / "sg" / "model.safetensors"))
    assert set(state) == set(LAYOUT) | {"fc.bias"} and not state["fc.bias"].any()
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert json.loads((tmp_path / "sg" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle"]
    back = import_head(tmp_path / "sg")
    assert torch.equal(back.fc.weight, head.fc.weight.to(torch.float16))


def eagle1_reference(w: dict, cfg: LlamaConfig, embeds: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """EAGLE-1's forward as the serving engines run it, from the exported tensors alone: fc([embedding ;
    feature]), the layer with no input norm, no final norm; the output goes to the target's LM head."""
    B, T, _ = embeds.shape
    x = F.linear(torch.cat([embeds, feature], -1), w["fc.weight"])
    q = F.linear(x, w["layers.0.self_attn.q_proj.weight"]).view(B, T, HEADS, HD).transpose(1, 2)
    k = F.linear(x, w["layers.0.self_attn.k_proj.weight"]).view(B, T, KV, HD).transpose(1, 2)
    v = F.linear(x, w["layers.0.self_attn.v_proj.weight"]).view(B, T, KV, HD).transpose(1, 2)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1),
                                       is_causal=True)  # fmt: skip
    x = x + F.linear(o.transpose(1, 2).reshape(B, T, -1), w["layers.0.self_attn.o_proj.weight"])
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    h = h * w["layers.0.post_attention_layernorm.weight"]
    gate, up = F.linear(h, w["layers.0.mlp.gate_proj.weight"]), F.linear(h, w["layers.0.mlp.up_proj.weight"])
    mlp = F.linear(F.silu(gate) * up, w["layers.0.mlp.down_proj.weight"])
    return x + mlp


def test_the_layout_means_what_our_head_computes(trained, tmp_path):
    head, path = trained
    export_head(ExportConfig(head=str(path), out=str(tmp_path / "e"), dtype="fp32"))
    w = load_file(str(tmp_path / "e" / "model.safetensors"))
    ours = import_head(tmp_path / "e")
    embed, lm_head = torch.nn.Embedding(VOCAB, D), torch.nn.Linear(D, VOCAB, bias=False)
    attach_parts(ours, embed, lm_head)
    features, tokens = torch.randn(2, 7, D), torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        want = eagle1_reference(w, LlamaConfig.from_pretrained(tmp_path / "e"), embed(tokens), features)
        torch.testing.assert_close(ours(features, tokens), want, rtol=1e-4, atol=1e-4)


def test_heads_without_the_eagle1_math_are_refused(tmp_path, capsys):
    torch.manual_seed(0)
    ours = save_head(tmp_path / "ours" / "best_model", DraftHead(head_config(layout="specalign")))
    with pytest.raises(SpecalignError, match="specalign layout head: EAGLE-1's layout holds a plain eagle head"):
        export_head(ExportConfig(head=str(ours), out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
    with pytest.raises(SpecalignError, match="--layout eagle-1: EAGLE-1's head reads the target's last layer alone"):
        HeadTrainConfig(features="f", kind="eagle+events", layout="eagle-1")
    with pytest.raises(SpecalignError, match="--layout: unknown head layout 'eagle-3'"):
        head_config(layout="eagle-3")
    with pytest.raises(SpecalignError, match="--engine: unknown engine 'tgi'"):
        ExportConfig(head="h", out="o", engine="tgi")
    # through the CLI: one line, exit 2, and an occupied --out is not touched
    ok = save_head(tmp_path / "ok" / "best_model", DraftHead(head_config()))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["export-head", "--head", str(ok), "--out", str(tmp_path / "busy")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(SpecalignError, match="not an exported head: config.json is missing"):
        import_head(tmp_path / "busy")
