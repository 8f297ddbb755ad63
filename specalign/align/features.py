"""Teacher-forced features for draft heads: what `specalign extract --hidden-states` stores, and its reader.

For every (sample, question) with the target's greedy answer a (n tokens), one forward of each model over a
text both read (self-distillation data: the target's own answers, not the reference answers):

    ids     long [m]   the target's tokens after its last visual placeholder: its prompt text (k), then a
    target  [m, D]     the target's final normed state at those positions: row i is the feature ids[i + 1] was
                       predicted from (LM head argmax == ids[i + 1] for i >= k - 1); the last row predicts past
                       the answer and is kept. A head never sees the visual positions (HiViS): the text positions
                       already fused the image.
    layers  [m, 3D]    with --hidden-layers: the outputs of decoder layers `fused_layers(n_layers)` (EAGLE-3's
                       low, middle and high), concatenated in that order
    draft   [n, Dd]    the draft's final normed state over ITS prompt (its event image, its template) + a[:-1]:
                       row j predicts a[j], the same prediction as target row k - 1 + j
    events  [N, Dd]    per sample: the draft's visual tokens as spliced into its prompt (EventGPT: the
                       spatio-temporal event tokens after the projector and the feature adaptor)

Layout of `<run>/features/`:

    target.rank<R>.<n>.safetensors   per finished target batch: "<s>_<q>.ids", "<s>_<q>.target", "<s>_<q>.layers"
    draft.rank<R>.<n>.safetensors    per finished draft batch: "<s>_<q>.draft", "<s>.events"
    index.jsonl                      one line per answer and role {role, sample_idx, question_idx, file,
                                     prompt_len, answer_len}, appended after its file is written (rank R > 0
                                     of a torchrun writes index.rank<R>.jsonl)
    meta.json                        names, widths, layer indices, vocab sizes, dtypes, counts, tokenizer
                                     fingerprint; written when the extraction finishes

Two files per batch (not one) because the draft's pass needs the target's answers, and only one model is in
memory at a time. An answer is a record of the store once both its lines are in the index.

    store = FeatureStore("runs/pairs_train")      # lazy: opens a file when a record is read
    rec = store[0]                                # FeatureRecord
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import atomic_path, ensure_dir, read_json, write_bytes, write_json
from specalign.models.base import _CACHE_KW, Prompt, _cache

FEATURES_DIR = "features"
META_FILE = "meta.json"
INDEX_FILE = "index.jsonl"
ROLES = ("target", "draft")
FORMAT = 1


def fused_layers(n_layers: int) -> tuple[int, int, int]:
    """The low, middle and high decoder layers whose outputs EAGLE-3 fuses: (0, n // 2, n - 1)."""
    return (0, n_layers // 2, n_layers - 1)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's sorted (token, id) items: equal fingerprints, same ids for the same tokens."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


# ---- positions ------------------------------------------------------------------------------------------------
def placeholder_ids(vlm) -> list[int]:
    """The ids a backend puts in the prompt where visual tokens go: EventGPT's event placeholder (-200),
    Video-LLaVA's `<video>` and `<image>`, LLaVA's `<image>`."""
    from specalign.models.eventgpt import PLACEHOLDER_ID

    ids = [PLACEHOLDER_ID] if vlm.kind == "eventgpt" else []
    config = vlm.model.config
    for name in ("video_token_index", "image_token_index", "video_token_id", "image_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def visual_positions_end(vlm, input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first position after the last visual placeholder of each row: input_ids long [..., T] ->
    long [...] (0 for a row without placeholders)."""
    slots = torch.isin(input_ids, torch.tensor(placeholder_ids(vlm), device=input_ids.device))
    T = input_ids.shape[-1]
    last = torch.where(slots, torch.arange(1, T + 1, device=input_ids.device), 0)
    return last.max(dim=-1).values


# ---- the forward passes ---------------------------------------------------------------------------------------
def decoder(vlm):
    """The model's Llama decoder (a LlamaModel: `layers`, `norm`)."""
    return vlm.model.get_decoder()


@contextmanager
def _capture(vlm, layers: tuple[int, ...] = (), inputs: bool = False):
    """Record, during the forward inside the block, the final norm's output ("final"), the outputs of the given
    decoder layers (their index) and, with inputs, the first layer's input ("inputs": the token embeddings with
    the visual tokens spliced in). Hooks rather than output_hidden_states: HF's hidden_states[-1] is the normed
    state put in place of the last layer's output, so the top layer's own output is only seen here, and the
    other layers' states are never kept (about n_layers x B x T x D at 7B)."""
    dec = decoder(vlm)
    seen: dict = {}

    def output(key):
        def hook(module, args, out):
            seen[key] = out[0] if isinstance(out, tuple) else out  # decoder layers return a tuple in older versions

        return hook

    def first_input(module, args, kwargs):
        seen["inputs"] = args[0] if args else kwargs["hidden_states"]

    hooks = [dec.norm.register_forward_hook(output("final"))]
    hooks += [dec.layers[i].register_forward_hook(output(i)) for i in layers]
    if inputs:
        hooks.append(dec.layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _teacher_forced(vlm, prompts: list[Prompt], continuations: list[list[int]], layers: tuple[int, ...] = (),
                    events: bool = False) -> list[dict]:  # fmt: skip
    """Each prompt followed by its continuation, through the model's own forward. Returns per row, over its text
    positions (those after its last visual placeholder; L = their count + len(continuation)): {"final": [L, D],
    i: [L, D] for each layer index, "events": [N, D] with events (the first layer's input at the placeholders:
    the visual tokens as spliced in)}, on the model's device.

    A sample asked one question is one row of a left-padded batch. The rows of a sample asked several (prompts
    holding the same visual dict, as extraction builds them) share its visual prefix (the prompt up to its last
    placeholder): it runs once, its K/V repeated for each row, then the rows' text runs in one forward, so the
    2k-token visual prompt of a 7B target costs one prefill per sample, not one per question (at 7B shape on one
    H200: 64 pairs/s at 10 questions per sample, 14 when each row runs in full)."""
    groups: dict[tuple, list[int]] = {}
    for r, p in enumerate(prompts):
        end = int(visual_positions_end(vlm, p.input_ids))
        if end == len(p.input_ids):  # no backend does this: its template always follows the visual tokens with text
            raise SpecalignError(f"{vlm.name}: the prompt ends with its visual tokens; features need text after them")
        groups.setdefault((id(p.visual), end, tuple(p.input_ids[:end].tolist())), []).append(r)
    out: list[dict] = [{} for _ in prompts]
    alone = [rows[0] for rows in groups.values() if len(rows) == 1]
    if alone:
        _rows_alone(vlm, prompts, continuations, alone, layers, events, out)
    for (_, end, _), rows in groups.items():
        if len(rows) > 1:
            _rows_sharing(vlm, prompts, continuations, rows, end, layers, events, out)
    return out


def _visual(vlm, visual: dict) -> dict:
    dev = vlm.device
    return vlm.visual_kwargs({k: v.to(dev, vlm.dtype if v.is_floating_point() else v.dtype) for k, v in visual.items()})


def _rows_alone(vlm, prompts, continuations, rows, layers, events, out) -> None:
    """`_teacher_forced` for rows that share nothing: one left-padded batch, one forward."""
    full = [Prompt(torch.cat([prompts[r].input_ids, torch.tensor(continuations[r], dtype=torch.long)]),
                   prompts[r].visual, "") for r in rows]  # fmt: skip
    batch = vlm.collate(full)
    vlm.check_tokens(batch.input_ids)
    mask = batch.attention_mask.to(vlm.device)
    with _capture(vlm, layers, inputs=events) as seen:
        vlm.model(input_ids=batch.input_ids.to(vlm.device), attention_mask=mask,
                  position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False, logits_to_keep=1,
                  **_visual(vlm, batch.visual))  # fmt: skip
    W = batch.input_ids.shape[1]
    for b, r in enumerate(rows):
        pad = W - len(full[b].input_ids)
        first = pad + int(visual_positions_end(vlm, prompts[r].input_ids))
        out[r] = {k: seen[k][b, first:] for k in ("final", *layers)}
        if events:
            out[r]["events"] = seen["inputs"][b, pad:first][_slots(vlm, full[b].input_ids[: first - pad])]


def _rows_sharing(vlm, prompts, continuations, rows, end, layers, events, out) -> None:
    """`_teacher_forced` for the rows of one sample, whose first `end` ids (up to the last placeholder) agree."""
    dev = vlm.device
    prefix = prompts[rows[0]].input_ids[None, :end].to(dev)
    vlm.check_tokens(prefix)
    with _capture(vlm, inputs=events) as pre:
        cache = _cache(vlm.model(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                                 position_ids=torch.arange(end, device=dev)[None], use_cache=True, logits_to_keep=1,
                                 **_visual(vlm, prompts[rows[0]].visual)))  # fmt: skip
    cache.batch_repeat_interleave(len(rows))
    texts = [torch.cat([prompts[r].input_ids[end:], torch.tensor(continuations[r], dtype=torch.long)]) for r in rows]
    W = max(len(t) for t in texts)
    text = torch.full((len(rows), W), vlm.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), end + W), dtype=torch.long)
    mask[:, :end] = 1
    for j, t in enumerate(texts):  # left-padded after the shared prefix
        text[j, W - len(t) :] = t
        mask[j, end + W - len(t) :] = 1
    vlm.check_tokens(text)
    mask = mask.to(dev)
    with _capture(vlm, layers) as seen:
        vlm.model(input_ids=text.to(dev), attention_mask=mask, position_ids=(mask.cumsum(1) - 1)[:, end:],
                  use_cache=True, logits_to_keep=1, **{_CACHE_KW: cache})  # fmt: skip
    for j, (r, t) in enumerate(zip(rows, texts, strict=True)):
        out[r] = {k: seen[k][j, W - len(t) :] for k in ("final", *layers)}
        if events:
            out[r]["events"] = pre["inputs"][0][_slots(vlm, prefix[0])]


def _slots(vlm, ids: torch.Tensor) -> torch.Tensor:
    """bool [T]: which of ids [T] are visual placeholders."""
    return torch.isin(ids, torch.tensor(placeholder_ids(vlm), device=ids.device)).to(vlm.device)


@torch.inference_mode()
def target_features(vlm, prompts: list[Prompt], answers: list[list[int]], layers: tuple[int, ...] | None = None):
    """The target over each prompt + its whole answer a (n tokens), teacher-forced. Returns per prompt {"ids"
    long [m], "prompt_len" k, "target" [m, D], "layers" [m, 3D] when `layers` (decoder-layer indices) are given},
    on the CPU in the model's dtype; m = k + n, k = the prompt's positions after its last visual placeholder."""
    out = []
    for p, a, f in zip(prompts, answers, _teacher_forced(vlm, prompts, answers, layers or ()), strict=True):
        k = len(f["final"]) - len(a)
        rec = {"ids": torch.cat([p.input_ids[len(p.input_ids) - k :], torch.tensor(a, dtype=torch.long)]),
               "prompt_len": k, "target": _keep(f["final"], vlm.dtype)}  # fmt: skip
        if layers:
            rec["layers"] = _keep(torch.cat([f[i] for i in layers], dim=-1), vlm.dtype)
        out.append(rec)
    return out


@torch.inference_mode()
def draft_features(vlm, prompts: list[Prompt], answers: list[list[int]], limit: int):
    """The draft over each of its own prompts + the target's answer a[:-1], teacher-forced; target ids >= limit
    (the shared vocabulary) go in as the draft's unknown token, as `decode.sources.VLMDraft` feeds them. Returns
    per prompt {"draft" [n, Dd] (row j: the state a[j] is predicted from), "events" [N, Dd] (the visual tokens
    as spliced in)}, on the CPU in the model's dtype."""
    unk = vlm.tokenizer.unk_token_id
    stand_in = unk if unk is not None and unk < limit else vlm.pad_token_id
    fed = [[t if t < limit else stand_in for t in a[:-1]] for a in answers]
    out = []
    for a, f in zip(answers, _teacher_forced(vlm, prompts, fed, events=True), strict=True):
        last = len(f["final"]) - len(a)  # the prompt's last position: it predicts a[0]
        out.append({"draft": _keep(f["final"][last:], vlm.dtype), "events": _keep(f["events"], vlm.dtype)})
    return out


def _keep(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).cpu().contiguous()


# ---- writing --------------------------------------------------------------------------------------------------
def index_name(rank: int) -> str:
    """Each rank appends to its own index (one writer per file)."""
    return INDEX_FILE if rank == 0 else f"index.rank{rank}.jsonl"


def _index_lines(path: Path) -> list[dict]:
    """The finished lines of one index file; a torn last line (killed mid-write) is dropped."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("role") in ROLES:
            out.append(rec)
    return out


def read_index(folder: Path) -> dict[str, dict[tuple[int, int], dict]]:
    """{role: {(sample_idx, question_idx): index line}} over every rank's index in a features folder."""
    done: dict[str, dict] = {r: {} for r in ROLES}
    for path in sorted(folder.glob("index*.jsonl")):
        for rec in _index_lines(path):
            done[rec["role"]].setdefault((rec["sample_idx"], rec["question_idx"]), rec)
    return done


class FeatureWriter:
    """Appends one role's finished batches to a features folder: the safetensors file first (atomically), then
    its index lines (flushed, synced), so a kill never leaves a line naming a missing file. Opening it drops a
    torn last index line and this rank's files of this role that no line names (a batch killed between its
    file and its lines), so a resume rewrites them."""

    def __init__(self, folder: Path, role: str, rank: int = 0):
        self.folder, self.role, self.rank = ensure_dir(folder), role, rank
        self.index = folder / index_name(rank)
        lines = _index_lines(self.index)
        raw = self.index.read_bytes() if self.index.exists() else b""
        if raw and (not raw.endswith(b"\n") or len(lines) != raw.count(b"\n")):
            write_bytes(self.index, "".join(json.dumps(r) + "\n" for r in lines).encode())  # no torn tail
        named = {r["file"] for rec in read_index(folder).values() for r in rec.values()}
        self.count = 0
        for f in sorted(folder.glob(f"{role}.rank{rank}.*.safetensors")):
            self.count = max(self.count, int(f.name.split(".")[2]) + 1)
            if f.name not in named:
                f.unlink()
        self.done = set(read_index(folder)[role])

    def write(self, tensors: dict[str, torch.Tensor], lines: list[dict]) -> str:
        """One finished batch: tensors under their keys, then one index line per answer (file filled in)."""
        from safetensors.torch import save_file

        name = f"{self.role}.rank{self.rank}.{self.count:06d}.safetensors"
        self.count += 1
        with atomic_path(self.folder / name) as tmp:
            save_file(tensors, str(tmp))
        with open(self.index, "a") as f:
            for line in lines:
                f.write(json.dumps({"role": self.role, **line, "file": name}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for line in lines:
            self.done.add((line["sample_idx"], line["question_idx"]))
        return name


def batch_tensors(role: str, chunk: list[tuple[int, int]], feats: list[dict], answers: list[list[int]]):
    """One finished batch of `target_features` / `draft_features` as (safetensors dict, index lines)."""
    tensors: dict[str, torch.Tensor] = {}
    lines = []
    for (s, q), f, a in zip(chunk, feats, answers, strict=True):
        line = {"sample_idx": s, "question_idx": q, "answer_len": len(a)}
        if role == "target":
            tensors[f"{s}_{q}.ids"], tensors[f"{s}_{q}.target"] = f["ids"], f["target"]
            if "layers" in f:
                tensors[f"{s}_{q}.layers"] = f["layers"]
            line["prompt_len"] = f["prompt_len"]
        else:
            tensors[f"{s}_{q}.draft"] = f["draft"]
            tensors.setdefault(f"{s}.events", f["events"])  # once per sample: its questions share it
        lines.append(line)
    return tensors, lines


def model_info(vlm) -> dict:
    """What meta.json records of one model (and what a head checks it was trained for)."""
    dec = decoder(vlm)
    return {"name": vlm.name, "hidden_size": int(dec.norm.weight.shape[0]), "n_layers": len(dec.layers),
            "vocab_size": int(vlm.vocab_size), "dtype": str(vlm.dtype).removeprefix("torch."),
            "tokenizer_fingerprint": tokenizer_fingerprint(vlm.tokenizer)}  # fmt: skip


def write_meta(folder: Path, info: dict[str, dict], layer_indices, shared_vocab: int, samples: int,
               questions: int) -> dict:  # fmt: skip
    """meta.json of a finished features folder (info: `model_info` of each role); returns it."""
    index = read_index(folder)
    t, d = info["target"], info["draft"]
    meta = {"format": FORMAT, "target": t["name"], "draft": d["name"],
            "target_hidden_size": t["hidden_size"], "draft_hidden_size": d["hidden_size"],
            "target_n_layers": t["n_layers"], "draft_n_layers": d["n_layers"],
            "layer_indices": list(layer_indices) if layer_indices else None,
            "target_vocab_size": t["vocab_size"], "draft_vocab_size": d["vocab_size"], "shared_vocab": shared_vocab,
            "target_dtype": t["dtype"], "draft_dtype": d["dtype"],
            "records": len(set(index["target"]) & set(index["draft"])), "samples": samples, "questions": questions,
            "tokenizer_fingerprint": t["tokenizer_fingerprint"],
            "draft_tokenizer_fingerprint": d["tokenizer_fingerprint"]}  # fmt: skip
    write_json(folder / META_FILE, meta)
    return meta


# ---- reading --------------------------------------------------------------------------------------------------
@dataclass
class FeatureRecord:
    """The features of one (sample, question): see the module docstring. n = m - k answer tokens."""

    sample_idx: int
    question_idx: int
    ids: torch.Tensor  # long [m]: prompt text (k), then the target's answer
    prompt_len: int  # k
    target: torch.Tensor  # [m, D]: target row i predicts ids[i + 1]
    layers: torch.Tensor | None  # [m, 3D] (with --hidden-layers)
    draft: torch.Tensor  # [n, Dd]: draft row j predicts ids[k + j], as target row k - 1 + j does
    events: torch.Tensor  # [N, Dd]


class FeatureStore:
    """The features of an extraction run, read lazily: a record's files are opened when it is read, nothing big
    is cached. Every file's header is checked on opening (a truncated file fails here, on one line)."""

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise fail(run_dir, "no such folder (expected an extraction run made with --hidden-states)")
        folder = run_dir if (run_dir / META_FILE).is_file() or run_dir.name == FEATURES_DIR else run_dir / FEATURES_DIR
        if not folder.is_dir():
            raise fail(run_dir, "no features in this run (extract with --hidden-states)")
        if not (folder / META_FILE).is_file():
            raise fail(folder / META_FILE, "missing: the extraction did not finish (re-run it to resume)")
        self.folder = folder
        self.meta: dict = read_json(folder / META_FILE)
        index = read_index(folder)
        keys = sorted(set(index["target"]) & set(index["draft"]))
        if len(keys) != self.meta.get("records"):
            raise fail(folder / INDEX_FILE, f"lists {len(keys)} complete records, {META_FILE} says "
                                            f"{self.meta.get('records')}")  # fmt: skip
        self._keys = keys
        self._lines = {k: (index["target"][k], index["draft"][k]) for k in keys}
        self._check_files()

    def _check_files(self) -> None:
        """Each file opens as safetensors and holds every key the index puts in it (headers only)."""
        from safetensors import safe_open

        wanted: dict[str, set[str]] = {}
        for (s, q), (t, d) in self._lines.items():
            wanted.setdefault(t["file"], set()).update(f"{s}_{q}.{k}" for k in ("ids", "target"))
            if self.meta.get("layer_indices"):
                wanted[t["file"]].add(f"{s}_{q}.layers")
            wanted.setdefault(d["file"], set()).update((f"{s}_{q}.draft", f"{s}.events"))
        for name, keys in wanted.items():
            path = self.folder / name
            if not path.is_file():
                raise fail(path, "missing (the features index names it)")
            try:
                with safe_open(str(path), framework="pt") as f:
                    have = set(f.keys())
            except Exception as e:
                raise fail(path, f"truncated or corrupt features file ({one_line(e)})") from None
            if keys - have:
                raise fail(path, f"lacks {sorted(keys - have)[0]} (the features index names it)")

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[tuple[int, int]]:
        """(sample_idx, question_idx) of every record, in order."""
        return list(self._keys)

    def __getitem__(self, i: int) -> FeatureRecord:
        s, q = self._keys[i]
        t, d = self._lines[(s, q)]
        names = [f"{s}_{q}.ids", f"{s}_{q}.target"] + ([f"{s}_{q}.layers"] if self.meta.get("layer_indices") else [])
        got = self._read(t["file"], names)
        draft, events = self._read(d["file"], [f"{s}_{q}.draft", f"{s}.events"])
        layers = got[2] if len(got) == 3 else None
        return FeatureRecord(s, q, got[0], int(t["prompt_len"]), got[1], layers, draft, events)

    def _read(self, name: str, keys: list[str]) -> list[torch.Tensor]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.folder / name), framework="pt") as f:
                return [f.get_tensor(k) for k in keys]
        except Exception as e:  # changed on disk since the store was opened
            raise fail(self.folder / name, f"cannot read {keys[0]} ({one_line(e)})") from None


def load_all(store: FeatureStore) -> list[FeatureRecord]:
    """Every record in memory (for small sets)."""
    return [store[i] for i in range(len(store))]
