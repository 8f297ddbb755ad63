"""The reference study's TokenAdapter: maps the draft model's generated tokens to the target model's next tokens.

Architecture: token embedding + learned positions -> causal TransformerEncoder -> LayerNorm -> Linear.
The default config has exactly 45,486,346 parameters, which pins these layer choices:

    embedding      nn.Embedding(32010, 512, padding_idx=0)                     16,389,120
    pos_embedding  nn.Embedding(128, 512)                                          65,536
    transformer    4 x nn.TransformerEncoderLayer(512, 8, 2048, 0.1, gelu,     12,609,536
                   batch_first=True), biases everywhere (3,152,384 each);
                   nn.TransformerEncoder(norm=None)
    norm           nn.LayerNorm(512)                                                1,024
    head           nn.Linear(512, 32010, bias=True)                            16,421,130
                                                                               ----------
                                                                               45,486,346

A head without bias would give 45,454,336; an extra encoder-level norm 45,487,370. `norm_first` does not change the
count (or the state-dict keys), so the count cannot tell it; we use PyTorch's default, post-norm (norm_first=False),
the plain `nn.TransformerEncoderLayer(d, h, ffn, dropout, activation="gelu", batch_first=True)` call.
The token_bias variant adds a `token_bias` vector [vocab] to the logits and uses 64 positions (45,485,588 parameters).

Training alignment: the logits at draft position i (having seen draft[:i+1]) predict target[i+1] -- the reference's
"draft[:, :-1] predicts target[:, 1:]". Evaluate with the same shift (its benchmark compared argmax[i] with
target[i], an off-by-one that changes the reported numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import atomic_path, ensure_dir, read_json, write_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class TokenAdapterConfig:
    vocab_size: int = 32010
    embed_dim: int = 512
    num_layers: int = 4
    num_heads: int = 8
    ffn_dim: int = 2048
    max_positions: int | None = None  # None: 128, or 64 for the token_bias variant
    dropout: float = 0.1
    pad_id: int = 0
    token_bias: bool = False
    target_vocab_size: int | None = None  # None: vocab_size
    norm_first: bool = False  # not visible in the parameter count or the keys; PyTorch's default

    def __post_init__(self):
        if self.max_positions is None:
            self.max_positions = 64 if self.token_bias else 128
        if self.target_vocab_size is None:
            self.target_vocab_size = self.vocab_size
        if self.embed_dim % self.num_heads:
            raise SpecalignError(f"TokenAdapterConfig: embed_dim {self.embed_dim} is not divisible by "
                                 f"num_heads {self.num_heads}")  # fmt: skip


class TokenAdapter(nn.Module):
    """Causal transformer over draft tokens; outputs target-vocabulary logits for the *next* target token."""

    def __init__(self, config: TokenAdapterConfig | None = None):
        super().__init__()
        self.config = config = config or TokenAdapterConfig()
        self.source = "TokenAdapter"  # named in input errors; load_adapter sets it to the checkpoint path
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_id)
        self.pos_embedding = nn.Embedding(config.max_positions, config.embed_dim)
        layer = nn.TransformerEncoderLayer(
            config.embed_dim, config.num_heads, config.ffn_dim, config.dropout,
            activation="gelu", batch_first=True, norm_first=config.norm_first,
        )  # fmt: skip
        # enable_nested_tensor=False: the nested fast path ignores our combined mask layout
        self.transformer = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, config.target_vocab_size)
        if config.token_bias:
            self.token_bias = nn.Parameter(torch.zeros(config.target_vocab_size))

    def forward(
        self, draft_tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, check_ids: bool = True
    ) -> torch.Tensor:
        """draft_tokens long [B, S], attention_mask [B, S] (1 = real token, 0 = padding) -> logits [B, S, target_vocab].

        Position i attends to draft tokens <= i (and, with a mask, only to real ones). check_ids=False skips the
        id range check (a GPU sync) for callers that checked their whole data set once, like training.
        """
        cfg = self.config
        if draft_tokens.dim() != 2:
            raise fail(self.source, f"draft_tokens must be [batch, seq], got shape {tuple(draft_tokens.shape)}")
        B, S = draft_tokens.shape
        if S > cfg.max_positions:  # noqa: SIM300 (S is the sequence length, not a constant)
            raise fail(self.source, f"sequence of {S} tokens is longer than max_positions {cfg.max_positions}")
        # checked here because an out-of-range id crashes inside the CUDA embedding kernel with no useful message
        if check_ids and S and draft_tokens.numel():
            lo, hi = int(draft_tokens.min()), int(draft_tokens.max())
            if lo < 0 or hi >= cfg.vocab_size:
                bad = hi if hi >= cfg.vocab_size else lo
                raise fail(self.source, f"token id {bad} is outside the adapter vocabulary [0, {cfg.vocab_size})")
        pos = torch.arange(S, device=draft_tokens.device)
        x = self.embedding(draft_tokens) + self.pos_embedding(pos)[None]
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)  # True = may not attend
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, S):
                raise fail(self.source, f"attention_mask shape {tuple(attention_mask.shape)} != tokens {(B, S)}")
            mask = mask[None] | ~attention_mask.bool()[:, None, :]  # [B, S, S]
            mask = mask & ~torch.eye(S, dtype=torch.bool, device=x.device)  # a pad query sees itself: no NaN rows
            mask = mask.repeat_interleave(cfg.num_heads, dim=0)  # [B*H, S, S], the layout nn.MultiheadAttention takes
            x = self.transformer(x, mask=mask)
        else:
            x = self.transformer(x, mask=mask, is_causal=True)
        logits = self.head(self.norm(x))
        if cfg.token_bias:
            logits = logits + self.token_bias
        return logits


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- training alignment


def shifted_targets(draft: torch.Tensor, target: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Labels aligned with draft positions: draft [B, S], target [B, T] -> labels [B, S], labels[:, i] = target[:, i+1].

    Positions with no target token i+1 get pad_id (ignored by the loss). For S == T this is the reference's
    "draft[:, :-1] predicts target[:, 1:]" with the last draft position unlabelled.
    """
    B, S = draft.shape
    labels = torch.full((B, S), pad_id, dtype=torch.long, device=draft.device)
    n = min(S, target.shape[1] - 1)
    if n > 0:
        labels[:, :n] = target[:, 1 : n + 1]
    return labels


def adapter_loss(
    logits: torch.Tensor, draft: torch.Tensor, target: torch.Tensor, pad_id: int = 0, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Cross-entropy of logits [B, S, V] (the adapter run on draft [B, S]) against the shifted target [B, T].

    Target pad ids are ignored; label smoothing 0.1 as in the reference. Returns a scalar.
    """
    labels = shifted_targets(draft, target, pad_id)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing)  # fmt: skip


def topk_accuracy(
    logits: torch.Tensor, draft: torch.Tensor, target: torch.Tensor, k: int = 1, pad_id: int = 0
) -> float:
    """Teacher-forced top-k accuracy with the training shift (logits[i] vs target[i+1]), over non-pad labels."""
    labels = shifted_targets(draft, target, pad_id)
    keep = labels != pad_id
    if not keep.any():
        return 0.0
    hit = (logits.topk(k, dim=-1).indices == labels[..., None]).any(-1)
    return hit[keep].float().mean().item()


# ---------------------------------------------------------------- save / load


def save_adapter(adapter: TokenAdapter, path: str | Path) -> Path:
    """Write `path/` = model.safetensors + config.json, each file atomically (temp + rename)."""
    from safetensors.torch import save_file

    path = ensure_dir(path)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(path / CONFIG_NAME, dataclasses.asdict(adapter.config))  # last: a dir with a config is complete
    return path


# top-level module names of other TokenAdapter implementations -> ours (applied to the first dotted component)
_RENAMES = {
    "token_embedding": "embedding", "tok_embedding": "embedding", "token_emb": "embedding", "tok_emb": "embedding",
    "embed_tokens": "embedding", "embed": "embedding", "wte": "embedding",
    "position_embedding": "pos_embedding", "pos_embed": "pos_embedding", "pos_emb": "pos_embedding",
    "position_embeddings": "pos_embedding", "positional_embedding": "pos_embedding", "wpe": "pos_embedding",
    "encoder": "transformer", "transformer_encoder": "transformer",
    "ln_f": "norm", "final_norm": "norm", "norm_f": "norm", "layer_norm": "norm", "ln": "norm",
    "output": "head", "lm_head": "head", "output_proj": "head", "output_projection": "head", "fc_out": "head",
    "logit_bias": "token_bias", "output_bias": "token_bias",
}  # fmt: skip
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP and torch.compile wrappers
# config keys of other implementations -> our field names
_CONFIG_ALIASES = {
    "d_model": "embed_dim", "hidden_dim": "embed_dim", "hidden_size": "embed_dim", "embed_size": "embed_dim",
    "embedding_dim": "embed_dim", "n_layers": "num_layers", "num_encoder_layers": "num_layers",
    "nhead": "num_heads", "n_heads": "num_heads", "num_attention_heads": "num_heads",
    "dim_feedforward": "ffn_dim", "ff_dim": "ffn_dim", "ffn_hidden": "ffn_dim", "intermediate_size": "ffn_dim",
    "max_seq_len": "max_positions", "max_len": "max_positions", "max_length": "max_positions",
    "max_position_embeddings": "max_positions", "pad_token_id": "pad_id", "use_token_bias": "token_bias",
    "target_vocab": "target_vocab_size",
}  # fmt: skip


def _canonical_keys(state: dict) -> dict:
    """Strip wrapper prefixes, rename top-level modules, accept a raw positional parameter [P, E] or [1, P, E]."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        head, _, rest = key.partition(".")
        head = _RENAMES.get(head, head)
        key = f"{head}.{rest}" if rest else head
        if key == "transformer.norm.weight" or key == "transformer.norm.bias":
            key = key.removeprefix("transformer.")  # a norm given to nn.TransformerEncoder is the same final norm
        if key == "pos_embedding":  # nn.Parameter instead of nn.Embedding
            key, value = "pos_embedding.weight", value.reshape(-1, value.shape[-1])
        out[key] = value
    return out


def _infer_config(state: dict, stored: dict) -> dict:
    """Config fields from the tensor shapes, for those a stored config does not give. num_heads cannot be inferred."""
    fields = {}
    if "embedding.weight" in state:
        fields["vocab_size"], fields["embed_dim"] = state["embedding.weight"].shape
    if "pos_embedding.weight" in state:
        fields["max_positions"] = state["pos_embedding.weight"].shape[0]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
    if layers:
        fields["num_layers"] = max(layers) + 1
    if "transformer.layers.0.linear1.weight" in state:
        fields["ffn_dim"] = state["transformer.layers.0.linear1.weight"].shape[0]
    if "head.weight" in state:
        fields["target_vocab_size"] = state["head.weight"].shape[0]
    fields["token_bias"] = "token_bias" in state
    return {**fields, **stored}  # a stored config wins; a disagreeing one shows up as a shape mismatch


def _stored_config(path, blob) -> dict:
    """The config a .pt checkpoint carries under 'config' or 'args' (dict or argparse.Namespace), in our field names."""
    names = {f.name for f in dataclasses.fields(TokenAdapterConfig)}
    for key in ("config", "args"):
        raw = blob.get(key)
        if isinstance(raw, argparse.Namespace):
            raw = vars(raw)
        if isinstance(raw, dict):
            renamed = {_CONFIG_ALIASES.get(k, k): v for k, v in raw.items()}
            return {k: v for k, v in renamed.items() if k in names}  # training args carry lr, epochs, ... too
    return {}


def _read_pt(path: Path) -> tuple[dict, dict]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # reference scripts often save argparse args
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a zip/pickle, or a pickle that would need to run code
        raise fail(path, f"not a readable torch checkpoint ({one_line(e)})") from None
    if not isinstance(blob, dict):
        raise fail(path, f"expected a dict checkpoint, found {type(blob).__name__}")
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(blob.get(key), dict):
            return blob[key], _stored_config(path, blob)
    if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob, {}  # a bare state dict
    raise fail(path, f"no 'model_state_dict' in checkpoint (keys: {', '.join(map(str, list(blob)[:8]))})")


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise fail(path, "file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise fail(path, f"not a readable safetensors file ({one_line(e)})") from None


def load_adapter(
    path: str | Path, device: str | torch.device = "cpu", config: TokenAdapterConfig | None = None
) -> TokenAdapter:
    """Load a TokenAdapter, never executing code, from:

    - our directory (model.safetensors + config.json), or a `.safetensors` file with config.json beside it;
    - the reference's torch `.pt`: a dict with `model_state_dict` (or `state_dict`/`model`, or a bare state dict)
      and optionally `config`/`args`, read with `torch.load(weights_only=True)`.

    Sizes come from `config` if given, else the stored config, else the tensor shapes (num_heads defaults to 8).
    Missing/unexpected keys or a shape mismatch -> SpecalignError naming the file and the first offending key.
    Returns the adapter in eval mode on `device`.
    """
    path = Path(path)
    stored: dict = {}
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise fail(path, f"not an adapter directory: {WEIGHTS_NAME} is missing")
        state = _read_safetensors(weights)
        cfg_file = path / CONFIG_NAME
    elif path.suffix == ".safetensors":
        state = _read_safetensors(path)
        cfg_file = path.parent / CONFIG_NAME
    elif path.is_file():
        state, stored = _read_pt(path)
        cfg_file = None
    else:
        raise fail(path, "file not found")
    if cfg_file is not None and cfg_file.is_file():
        stored = read_json(cfg_file)
        if not isinstance(stored, dict):
            raise fail(cfg_file, "config is not a JSON object")
        stored = {_CONFIG_ALIASES.get(k, k): v for k, v in stored.items()}

    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise fail(path, f"state dict entry {bad!r} is not a tensor")
    state = _canonical_keys(state)
    if config is None:
        fields = _infer_config(state, stored)
        names = {f.name for f in dataclasses.fields(TokenAdapterConfig)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise fail(cfg_file or path, f"unknown adapter config field {unknown[0]!r}")
        try:
            config = TokenAdapterConfig(**fields)
        except (TypeError, SpecalignError) as e:
            raise fail(path, f"bad adapter config ({e})") from None

    with torch.device("meta"):  # no memory or init time for weights about to be replaced
        adapter = TokenAdapter(config)
    _check_state(path, adapter, state)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16/bf16 saves -> fp32
    adapter.load_state_dict(state, assign=True)
    adapter.source = str(path)
    return adapter.to(device).eval()


def _check_state(path: Path, adapter: TokenAdapter, state: dict) -> None:
    """One-line error for the first key (in module order) that is missing, unexpected or of the wrong shape."""
    expected = adapter.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise fail(path, f"not a TokenAdapter of this architecture: missing key {key!r}")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise fail(path, f"shape mismatch for {key!r}: checkpoint {tuple(state[key].shape)}, "
                             f"adapter {tuple(tensor.shape)}")  # fmt: skip
    extra = [k for k in state if k not in expected]
    if extra:
        raise fail(path, f"not a TokenAdapter of this architecture: unexpected key {extra[0]!r}")
