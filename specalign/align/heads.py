"""Draft heads on the target's own features (EAGLE-1/2/3), with or without the draft's event tokens, and the
feature adapter of the cascade draft VLM -> target feature space -> target LM head.

    head = DraftHead(HeadConfig.for_target("eagle", target_config, feature_size=256))
    attach_target(head, vlm)                                   # the target's frozen embeddings and LM head, shared
    x = head.inputs(features, tokens)                          # [B, T, F] + long [B, T] -> fc input of the layer
    hidden = head(features, tokens)                            # teacher-forced causal pass -> normed [B, T, D]
    logits = head.lm_head(hidden)                              # the target's vocabulary
    save_head("runs/head/best_model", head); head = load_head("runs/head/best_model", target_vlm=vlm)

Row i of a head's input is [feature of text token i ; embedding of text token i + 1] and its output predicts token
i + 2 (EAGLE's shift: the feature at i already "knows" token i + 1; the head is told it and guesses the one after).
Positions count the text tokens after the target's visual block from 0 (rotary attention depends on differences
only, so the offset of the visual block does not matter). The head never sees visual tokens (HiViS): the target's
text features already fused the image.

`eagle+events` adds a gated cross-attention from the fc output to the draft's event tokens (EventGPT's visual
tokens after its projector) inside `inputs`; its gate starts at 0 (tanh(0) = 0), so at initialisation the head is
exactly `eagle`. `feature-adapter` maps the draft VLM's last hidden state (row j predicts answer token j) to the
target's feature space.

On disk: a folder with config.json (format tag, HeadConfig) and model.safetensors (the head's own weights; the
target's embeddings and LM head are never saved: they are attached from the target at load time).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specalign.align.features import tokenizer_fingerprint
from specalign.decode.engine import apply_rotary
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import atomic_path, ensure_dir, write_json

KINDS = ("eagle", "eagle+events", "feature-adapter")
# specalign: an RMSNorm before the layer and after it, fc with a bias over [feature ; embedding]. eagle-1: EAGLE-1's
# head exactly as vLLM and SGLang run it (fc without bias over [embedding ; feature], no norm before the layer or
# after it: the layer's output is both the logits' input and the next feature), so `export-head` can write it.
LAYOUTS = ("specalign", "eagle-1")
FORMAT = "specalign-draft-head"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------- config


@dataclass
class HeadConfig:
    """What a head is: its kind, its widths and its one Llama layer's shape, and the target it was trained for.

    feature_size: the width of the target features it reads (D: the last layer; 3D with `fused` low/mid/high
    layers). events_size: E, the draft's event token width (eagle+events). draft_size: Dd, the draft VLM's hidden
    width (feature-adapter). target: {name, hidden_size, vocab_size, tokenizer (fingerprint)}."""

    kind: str
    hidden_size: int
    vocab_size: int
    feature_size: int
    fused: bool = False
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 64
    intermediate_size: int = 768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    events_size: int | None = None
    draft_size: int | None = None
    layout: str = "specalign"
    target: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SpecalignError(f"--kind: unknown head kind {self.kind!r}: choose {', '.join(KINDS)}")
        for name in ("hidden_size", "vocab_size", "feature_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecalignError(f"head config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SpecalignError(f"head config: {self.num_attention_heads} attention heads are not a multiple of "
                                 f"{self.num_key_value_heads} key/value heads")  # fmt: skip
        width = 3 * self.hidden_size if self.fused else self.hidden_size
        if self.kind != "feature-adapter" and self.feature_size != width:
            raise SpecalignError(f"head config: feature_size {self.feature_size} is not {width} "
                                 f"({'3 x ' if self.fused else ''}hidden {self.hidden_size})")  # fmt: skip
        if self.kind == "eagle+events" and not self.events_size:
            raise SpecalignError("head config: eagle+events needs events_size (the draft's event token width)")
        if self.kind == "feature-adapter" and not self.draft_size:
            raise SpecalignError("head config: feature-adapter needs draft_size (the draft VLM's hidden width)")
        check_layout(self.layout, self.kind, self.fused)

    @classmethod
    def for_target(cls, kind: str, text_config: dict, fused: bool = False, events_size: int | None = None,
                   draft_size: int | None = None, target: dict | None = None,
                   layout: str = "specalign") -> HeadConfig:  # fmt: skip
        """A head shaped like one layer of the target's language model (EAGLE: the head's layer is the target's).
        text_config: `target_text_config`'s dict."""
        D = text_config["hidden_size"]
        return cls(kind=kind, hidden_size=D, vocab_size=text_config["vocab_size"],
                   feature_size=3 * D if fused else D, fused=fused,
                   num_attention_heads=text_config["num_attention_heads"],
                   num_key_value_heads=text_config["num_key_value_heads"], head_dim=text_config["head_dim"],
                   intermediate_size=text_config["intermediate_size"], rms_norm_eps=text_config["rms_norm_eps"],
                   rope_theta=text_config["rope_theta"], events_size=events_size, draft_size=draft_size,
                   layout=layout, target=dict(target or {}))  # fmt: skip

    def llama_config(self):
        """The transformers LlamaConfig of the head's one decoder layer."""
        from transformers import LlamaConfig

        cfg = LlamaConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                          num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                          head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, vocab_size=self.vocab_size,
                          num_hidden_layers=1, max_position_embeddings=self.max_position_embeddings,
                          rope_parameters={"rope_theta": float(self.rope_theta), "rope_type": "default"})  # fmt: skip
        cfg._attn_implementation = "sdpa"
        return cfg

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}


def check_layout(layout: str, kind: str, fused: bool) -> None:
    """A head layout the kind can take (eagle-1: a plain eagle head on the target's last layer)."""
    if layout not in LAYOUTS:
        raise SpecalignError(f"--layout: unknown head layout {layout!r}: choose {', '.join(LAYOUTS)}")
    if layout == "eagle-1" and (kind != "eagle" or fused):
        raise SpecalignError("--layout eagle-1: EAGLE-1's head reads the target's last layer alone: --kind eagle "
                             "without --fused")  # fmt: skip


def target_text_config(config: dict) -> dict:
    """The language model's shape from a target checkpoint's config.json dict (Video-LLaVA/LLaVA: `text_config`;
    EventGPT: top level), with Llama's defaults where the file leaves a field out (the 7B configs often do):
    {hidden_size, vocab_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
    rms_norm_eps, rope_theta}."""
    from transformers import LlamaConfig

    text = dict(config.get("text_config") or config)
    for key in ("model_type", "architectures", "auto_map", "torch_dtype", "dtype"):
        text.pop(key, None)
    if "vocab_size" not in text and "vocab_size" in config:
        text["vocab_size"] = config["vocab_size"]
    try:
        cfg = LlamaConfig(**text)
    except Exception as e:  # a malformed field: name it
        raise SpecalignError(f"target config: not a Llama-family language model ({one_line(e)})") from None
    rope = getattr(cfg, "rope_parameters", None) or {}
    heads = cfg.num_attention_heads
    return {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_attention_heads": heads,
            "num_key_value_heads": cfg.num_key_value_heads or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "intermediate_size": cfg.intermediate_size, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))}  # fmt: skip


# ---------------------------------------------------------------- the modules


class _TargetParts:
    """The target's frozen embeddings and LM head, attached, never registered (not trained, not saved, not moved
    by .to(): they stay where the target lives)."""

    def _attach(self, embed_tokens, lm_head) -> None:
        object.__setattr__(self, "embed_tokens", embed_tokens)
        object.__setattr__(self, "lm_head", lm_head)

    def _require_target(self) -> None:
        if getattr(self, "lm_head", None) is None:
            raise SpecalignError(f"{self.name}: no target attached (attach_target(head, vlm), or load_head(dir, "
                                 "target_vlm=...))")  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def name(self) -> str:
        target = self.head_config.target.get("name") or "?"
        return f"{self.head_config.kind} head for {target}" + (f" ({self.source})" if self.source else "")


class EventAttention(nn.Module):
    """Cross-attention from the head's fc output x [B, T, D] to projected event tokens [B, N, D] (no positions: the
    event tokens are a set of patches). Returns the attention output [B, T, D], to be gated by the caller."""

    def __init__(self, hidden: int, heads: int, eps: float):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        super().__init__()
        self.heads = heads
        self.norm = LlamaRMSNorm(hidden, eps=eps)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, events: torch.Tensor, events_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D], events [B, N, D] (projected and normed), events_mask bool [B, N] (True = a real token)."""
        B, T, D = x.shape
        N = events.shape[1]
        q = self.q_proj(self.norm(x)).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k_proj(events).view(B, N, self.heads, -1).transpose(1, 2)
        v = self.v_proj(events).view(B, N, self.heads, -1).transpose(1, 2)
        mask = None if events_mask is None else events_mask[:, None, None, :].to(x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))


class DraftHead(_TargetParts, nn.Module):
    """EAGLE's draft head: fc([feature_t ; embed(token_t+1)]) -> one Llama decoder layer -> norm -> the target's LM
    head (layout eagle-1: fc([embed ; feature]) -> the layer without its input norm -> the LM head). Attribute
    names are a one-layer Llama's (`layers`, `norm`, `rotary_emb`, `config`, `embed_tokens`, `lm_head`) so the
    decode engine can run the layer with its own KV cache after calling `inputs`."""

    def __init__(self, config: HeadConfig):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        if config.kind not in ("eagle", "eagle+events"):
            raise SpecalignError(f"DraftHead: kind {config.kind!r} is not a draft head (eagle, eagle+events)")
        self.head_config = config
        self.source = ""
        self.config = config.llama_config()
        D = config.hidden_size
        # fused low/mid/high features (3D) first become one D-wide feature, so the head's own outputs (D) can
        # stand in for it on later drafting steps (EAGLE-3's fc)
        self.fuse = nn.Linear(config.feature_size, D, bias=False) if config.fused else None
        eagle1 = config.layout == "eagle-1"
        self.fc = nn.Linear(2 * D, D, bias=not eagle1)
        self.layers = nn.ModuleList([LlamaDecoderLayer(self.config, 0)])
        self.norm = nn.Identity() if eagle1 else LlamaRMSNorm(D, eps=config.rms_norm_eps)
        if eagle1:
            self.layers[0].input_layernorm = nn.Identity()
        self.rotary_emb = LlamaRotaryEmbedding(self.config)
        if config.kind == "eagle+events":
            self.events_proj = nn.Linear(config.events_size, D)
            self.events_norm = LlamaRMSNorm(D, eps=config.rms_norm_eps)
            self.events_attn = EventAttention(D, config.num_attention_heads, config.rms_norm_eps)
            self.events_gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: starts as plain eagle
        self._attach(None, None)

    # ---- the input side: what the decode engine calls before its own pass through `layers` -------------------
    def inputs(self, features: torch.Tensor, tokens: torch.Tensor, events: torch.Tensor | None = None,
               events_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """features [B, T, F] (the target's: F = feature_size; or the head's own outputs: F = hidden_size),
        tokens long [B, T] (token t + 1 of each feature t), events [B, N, E] (eagle+events; events_mask bool
        [B, N], True on real tokens) -> the decoder layer's input x [B, T, D]."""
        self._require_target()
        if features.shape[-1] == self.head_config.feature_size and self.fuse is not None:
            features = self.fuse(features)
        elif features.shape[-1] != self.head_config.hidden_size:
            raise SpecalignError(f"{self.name}: features of width {features.shape[-1]}, expected "
                                 f"{self.head_config.feature_size}")  # fmt: skip
        embeds = self.embed_tokens(tokens.to(self.embed_tokens.weight.device)).to(features.device, features.dtype)
        pair = [embeds, features] if self.head_config.layout == "eagle-1" else [features, embeds]
        x = self.fc(torch.cat(pair, dim=-1))
        if self.head_config.kind == "eagle+events":
            if events is None:
                raise SpecalignError(f"{self.name}: this head reads the draft's event tokens; none were given")
            ev = self.events_norm(self.events_proj(events.to(x.dtype)))
            x = x + torch.tanh(self.events_gate).to(x.dtype) * self.events_attn(x, ev, events_mask)
        return x

    # ---- teacher-forced passes ------------------------------------------------------------------------------
    def forward(self, features: torch.Tensor, tokens: torch.Tensor, events: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """A causal pass over positions 0..T-1: features [B, T, F], tokens long [B, T], events [B, N, E] or
        None, attention_mask [B, T] (1 on real positions; right padding) -> normed hidden [B, T, D]."""
        return self.unroll(features, tokens, events, attention_mask, steps=1)[0]

    def unroll(self, features: torch.Tensor, tokens: torch.Tensor, events: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, steps: int = 1,
               events_mask: torch.Tensor | None = None) -> list[torch.Tensor]:  # fmt: skip
        """Training-time test (EAGLE-3): `steps` passes, [normed hidden [B, T, D]] per step.

        Step 0 is the plain teacher-forced pass on the true features. At step j, position i takes the head's own
        step j-1 output at position i-1 as its feature (with the true token i + 1): it is the j-th draft of a
        chain started on the true feature of position i - j. It attends to the true keys at positions <= i - j
        and to its chain's keys of steps 1..j (positions i-j+1 .. i), which is exactly what a chain drafter's
        query sees after resyncing on an accepted prefix that ends at i - j. Outputs at i < j start no chain."""
        B, T = tokens.shape
        layer = self.layers[0]
        attn = layer.self_attn
        hd = self.head_config.head_dim
        positions = torch.arange(T, device=features.device)[None].expand(B, T)
        valid = (torch.ones(B, T, dtype=torch.bool, device=features.device) if attention_mask is None
                 else attention_mask.to(features.device).bool())  # fmt: skip
        keys, values, outs = [], [], []
        feats = features
        cos = sin = None
        for j in range(steps):
            x = self.inputs(feats, tokens, events, events_mask)
            if cos is None:
                cos, sin = self.rotary_emb(x, positions)
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, -1, hd).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, -1, hd).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, -1, hd).transpose(1, 2)
            q, k = apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype))
            keys.append(k)
            values.append(v)
            mask = ttt_mask(T, j, valid)
            o = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask,
                                               enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            out = self.norm(x)
            outs.append(out)
            # position i's next feature is this step's output at i - 1; position 0 starts no chain (zeros)
            feats = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        return outs

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> float32 logits [..., V] through the target's frozen LM head."""
        self._require_target()
        w = self.lm_head.weight
        return F.linear(hidden.to(w.dtype), w.detach(), None).float()


def ttt_mask(T: int, step: int, valid: torch.Tensor) -> torch.Tensor:
    """Keys a query sees at training-time-test step `step` (keys of steps 0..step concatenated, T each) ->
    bool [B, 1, T, (step + 1) * T], True = attend. valid bool [B, T]: real (non-padding) positions.

    Step-0 keys (true features): positions p <= i - step. Step-l keys, l = 1..step: the chain's own key at
    p == i - step + l (the diagonal). Step 0 alone is the causal mask."""
    dev = valid.device
    i = torch.arange(T, device=dev)[:, None]
    p = torch.arange(T, device=dev)[None, :]
    blocks = [p <= i - step] + [p == i - step + lv for lv in range(1, step + 1)]
    mask = torch.cat(blocks, dim=1)[None] & valid.repeat(1, step + 1)[:, None, :]  # [B, T, (s+1)T]
    return mask[:, None]


class FeatureAdapter(_TargetParts, nn.Module):
    """The cascade's adapter: the draft VLM's last hidden state [.., Dd] -> Linear, SiLU, Linear, RMSNorm -> the
    target's (normed) feature space [.., D], read by the target's frozen LM head."""

    def __init__(self, config: HeadConfig):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        super().__init__()
        if config.kind != "feature-adapter":
            raise SpecalignError(f"FeatureAdapter: kind {config.kind!r} is not feature-adapter")
        self.head_config = config
        self.source = ""
        D = config.hidden_size
        self.up = nn.Linear(config.draft_size, config.intermediate_size)
        self.act = nn.SiLU()
        self.down = nn.Linear(config.intermediate_size, D)
        self.norm = LlamaRMSNorm(D, eps=config.rms_norm_eps)
        self._attach(None, None)

    def forward(self, draft_hidden: torch.Tensor) -> torch.Tensor:
        """draft_hidden [..., Dd] -> target-space feature [..., D]."""
        return self.norm(self.down(self.act(self.up(draft_hidden))))

    logits = DraftHead.logits


def build_head(config: HeadConfig) -> DraftHead | FeatureAdapter:
    return FeatureAdapter(config) if config.kind == "feature-adapter" else DraftHead(config)


def attach_target(head: DraftHead | FeatureAdapter, vlm) -> None:
    """Share the target VLM's input embeddings and LM head with the head (the same tensors, not copies). The
    caller checks that they fit (`load_head(dir, target_vlm=vlm)` does)."""
    head._attach(vlm.model.get_input_embeddings(), vlm.model.lm_head)


def attach_parts(head: DraftHead | FeatureAdapter, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
    """Attach the target's embeddings and LM head given as modules (training reads just these two tensors)."""
    head._attach(embed_tokens, lm_head)


# ---------------------------------------------------------------- the target's identity


def target_hidden_size(path: str | Path) -> int:
    """The language model's width from a checkpoint directory's config.json (no weights read)."""
    from specalign.models.loading import read_config

    return target_text_config(read_config(path))["hidden_size"]


def vlm_identity(vlm) -> dict:
    """{name, hidden_size, vocab_size, tokenizer} of a loaded target VLM."""
    head = vlm.model.lm_head
    return {"name": vlm.name, "hidden_size": head.in_features, "vocab_size": head.out_features,
            "tokenizer": tokenizer_fingerprint(vlm.tokenizer)}  # fmt: skip


def info_identity(info: dict) -> dict:
    """{name, hidden_size, vocab_size, tokenizer} from `specalign.models.inspect_model`'s dict (no weights)."""
    return {"name": info.get("name") or info["path"], "hidden_size": target_hidden_size(info["path"]),
            "vocab_size": info["vocab_size"], "tokenizer": tokenizer_fingerprint(info["tokenizer"])}  # fmt: skip


def check_fits(path: str | Path, config: HeadConfig, target: dict) -> None:
    """Refuse, on one line, a head trained for another target: width, vocabulary, then tokenizer."""
    trained = config.target
    if (config.hidden_size, config.vocab_size) != (target["hidden_size"], target["vocab_size"]):
        raise fail(path, f"a head trained for target {trained.get('name', '?')} (hidden {config.hidden_size}, "
                         f"vocab {config.vocab_size}) cannot draft for target {target['name']} (hidden "
                         f"{target['hidden_size']}, vocab {target['vocab_size']})")  # fmt: skip
    mine, theirs = trained.get("tokenizer"), target.get("tokenizer")
    if mine and theirs and mine != theirs:
        raise fail(path, f"a head trained for target {trained.get('name', '?')} cannot draft for target "
                         f"{target['name']}: their tokenizers differ (fingerprints {mine[:12]}, "
                         f"{theirs[:12]})")  # fmt: skip


# ---------------------------------------------------------------- files


def save_head(path: str | Path, head: DraftHead | FeatureAdapter) -> Path:
    """Write `path/` = model.safetensors (the head's own weights) + config.json, each atomically; the config goes
    last, so a folder with a config is complete."""
    from safetensors.torch import save_file

    path = ensure_dir(path)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(path / CONFIG_NAME, head.head_config.to_json())
    return path


def read_head_config(path: str | Path) -> HeadConfig:
    """The HeadConfig of a head folder; one-line errors for a missing folder, a missing or foreign config."""
    path = Path(path)
    if not path.is_dir():
        raise fail(path, "head folder not found")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise fail(path, f"not a draft head folder: {CONFIG_NAME} is missing")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(cfg_file, f"not valid JSON ({one_line(e)})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise fail(cfg_file, f'not a draft head config (no "format": "{FORMAT}")')
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise fail(cfg_file, f"written by a newer specalign (format version {raw['format_version']})")
    names = {f.name for f in dataclasses.fields(HeadConfig)}
    try:
        return HeadConfig(**{k: v for k, v in raw.items() if k in names})
    except (TypeError, SpecalignError) as e:
        raise fail(cfg_file, one_line(e)) from None


def check_head(path: str | Path, target_info: dict) -> HeadConfig:
    """Every check of `load_head` against a target, before any model loads: the folder, its config and weight
    file, and the target's width (from its config.json), vocabulary and tokenizer. target_info:
    `specalign.models.inspect_model`'s dict (path, vocab_size, tokenizer; `name` optional)."""
    config = read_head_config(path)
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise fail(path, f"the head's weights are missing ({WEIGHTS_NAME})")
    _check_weight_header(weights)
    check_fits(path, config, info_identity(target_info))
    return config


def _check_weight_header(weights: Path) -> dict:
    """The tensor shapes a safetensors file declares, with its size checked against them (a truncated file is
    caught without reading the tensors)."""
    try:
        with open(weights, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = weights.stat().st_size
        if size < 8 + n + end:
            raise ValueError(f"{size} bytes, the header promises {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise fail(weights, f"weights unreadable or truncated ({one_line(e)})") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def load_head(path: str | Path, target_vlm=None) -> DraftHead | FeatureAdapter:
    """A head from its folder, on the CPU in the dtype it was saved in. With target_vlm: checked against that
    target (width, vocabulary, tokenizer) and attached to its embeddings and LM head (moved to its device)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_head_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise fail(path, f"the head's weights are missing ({WEIGHTS_NAME})")
    if target_vlm is not None:
        check_fits(path, config, vlm_identity(target_vlm))
    shapes = _check_weight_header(weights)
    head = build_head(config)
    expected = {k: list(v.shape) for k, v in head.state_dict().items()}
    for key, shape in expected.items():
        if key not in shapes:
            raise fail(weights, f"tensor {key} is missing (a head of another kind or shape?)")
        if list(shapes[key]) != shape:
            raise fail(weights, f"tensor {key} has shape {shapes[key]}, config.json says {shape}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise fail(weights, f"unexpected tensor {extra[0]} (a head of another kind?)")
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise fail(weights, f"weights unreadable or truncated ({one_line(e)})") from None
    dtype = next(iter(state.values())).dtype if state else torch.float32
    head.to(dtype).load_state_dict(state)
    head.source = str(path)
    if target_vlm is not None:
        head.to(target_vlm.device)
        attach_target(head, target_vlm)
    return head.eval()


def count_parameters(head: nn.Module) -> int:
    """The head's own trainable parameters (the target's embeddings and LM head are not the head's)."""
    return sum(p.numel() for p in head.parameters())
