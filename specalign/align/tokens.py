"""Draft/target token pairs: the reference study's token JSON and our own store (pairs.jsonl + manifest.json).

Reference format: a JSON object whose `results` is a list of
`{sample_idx, question_idx, sample_id, query, egpt_tokens, egpt_text, vl_tokens, vl_text}`;
egpt = EventGPT = the draft, vl = Video-LLaVA = the target. Token lists hold the generated tokens only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specalign.errors import fail
from specalign.fsutil import atomic_path, ensure_dir, write_json

PAIRS_NAME = "pairs.jsonl"
MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("egpt_tokens", "vl_tokens")  # the metadata keys are optional: older files lack some of them


@dataclass
class TokenPairs:
    """Parallel lists, one entry per pair. `vocab_size` None = unknown (the reference files do not say)."""

    draft: list[list[int]] = field(default_factory=list)
    target: list[list[int]] = field(default_factory=list)
    sample_id: list = field(default_factory=list)
    question_idx: list = field(default_factory=list)
    query: list[str] = field(default_factory=list)
    draft_text: list[str] = field(default_factory=list)
    target_text: list[str] = field(default_factory=list)
    sample_idx: list = field(default_factory=list)  # kept so a reference file round-trips unchanged
    vocab_size: int | None = None

    def __len__(self) -> int:
        return len(self.draft)

    def max_token_id(self) -> int:
        """Largest id in draft or target; -1 when there are no tokens."""
        return max((max(s) for s in self.draft + self.target if s), default=-1)

    def first_id_at_least(self, limit: int) -> tuple[str, int] | None:
        """("pair 3 egpt_tokens[2]", 99999): the first token id >= limit (draft before target); None if none."""
        for key, seqs in (("egpt_tokens", self.draft), ("vl_tokens", self.target)):
            for i, seq in enumerate(seqs):
                for j, t in enumerate(seq):
                    if t >= limit:
                        return f"pair {i} {key}[{j}]", t
        return None

    def labels(self, length: int, pad_id: int = 0) -> int:
        """Target tokens a TokenAdapter learns from at `length` positions: target[1:length] without pads."""
        return sum(1 for t in self.target for x in t[1:length] if x != pad_id)

    def extend(self, other: TokenPairs) -> None:
        for name in ("draft", "target", "sample_id", "question_idx", "query", "draft_text", "target_text",
                     "sample_idx"):  # fmt: skip
            getattr(self, name).extend(getattr(other, name))
        if other.vocab_size is not None:
            self.vocab_size = max(self.vocab_size or 0, other.vocab_size)


def _tokens(path, where: str, value) -> list[int]:
    if not isinstance(value, list):
        raise fail(path, f"{where}: expected a list of token ids, found {type(value).__name__}")
    for j, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise fail(path, f"{where}[{j}]: token id must be a non-negative int, found {t!r}")
    return value


def _add_entry(pairs: TokenPairs, path, where: str, entry, index: int) -> None:
    if not isinstance(entry, dict):
        raise fail(path, f"{where}: expected an object, found {type(entry).__name__}")
    for key in REQUIRED_KEYS:
        if key not in entry:
            raise fail(path, f"{where}: missing key {key!r}")
    pairs.draft.append(_tokens(path, f"{where}.egpt_tokens", entry["egpt_tokens"]))
    pairs.target.append(_tokens(path, f"{where}.vl_tokens", entry["vl_tokens"]))
    pairs.sample_id.append(entry.get("sample_id"))
    pairs.question_idx.append(entry.get("question_idx"))
    pairs.query.append(entry.get("query", ""))
    pairs.draft_text.append(entry.get("egpt_text", ""))
    pairs.target_text.append(entry.get("vl_text", ""))
    pairs.sample_idx.append(entry.get("sample_idx", index))


def _entry(pairs: TokenPairs, i: int) -> dict:
    return {
        "sample_idx": pairs.sample_idx[i] if i < len(pairs.sample_idx) else i,
        "question_idx": pairs.question_idx[i] if i < len(pairs.question_idx) else None,
        "sample_id": pairs.sample_id[i] if i < len(pairs.sample_id) else None,
        "query": pairs.query[i] if i < len(pairs.query) else "",
        "egpt_tokens": list(pairs.draft[i]),
        "egpt_text": pairs.draft_text[i] if i < len(pairs.draft_text) else "",
        "vl_tokens": list(pairs.target[i]),
        "vl_text": pairs.target_text[i] if i < len(pairs.target_text) else "",
    }


def _check_lengths(path, pairs: TokenPairs) -> None:
    if len(pairs.draft) != len(pairs.target):
        raise fail(path, f"{len(pairs.draft)} draft sequences but {len(pairs.target)} target sequences")


# ---------------------------------------------------------------- reference JSON


def read_reference_json(path: str | Path) -> TokenPairs:
    """Read the reference's token file (a JSON object with `results`)."""
    path = Path(path)
    if not path.is_file():
        raise fail(path, "file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise fail(path, f"cannot read token file ({e})") from None
    if not text.strip():
        raise fail(path, "token file is empty")
    try:
        blob = json.loads(text)
    except json.JSONDecodeError as e:
        raise fail(path, f"not valid JSON (truncated?): {e}") from None
    if not isinstance(blob, dict) or "results" not in blob:
        raise fail(path, "not a reference token file: expected a JSON object with a 'results' list")
    results = blob["results"]
    if not isinstance(results, list):
        raise fail(path, f"'results' must be a list, found {type(results).__name__}")
    pairs = TokenPairs()
    for i, entry in enumerate(results):
        _add_entry(pairs, path, f"results[{i}]", entry, i)
    return pairs


def write_reference_json(pairs: TokenPairs, path: str | Path) -> Path:
    """Write `pairs` in the reference format (atomically)."""
    path = Path(path)
    _check_lengths(path, pairs)
    write_json(path, {"results": [_entry(pairs, i) for i in range(len(pairs))]})
    return path


# ---------------------------------------------------------------- our store


def write_pairs(pairs: TokenPairs, directory: str | Path) -> Path:
    """Write `directory/pairs.jsonl` (one reference-style object per line) and `manifest.json` (written last)."""
    directory = ensure_dir(directory)
    _check_lengths(directory, pairs)
    with atomic_path(directory / PAIRS_NAME) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i in range(len(pairs)):
            f.write(json.dumps(_entry(pairs, i), ensure_ascii=False) + "\n")
    write_json(directory / MANIFEST_NAME, {"format": "specalign.token_pairs", "count": len(pairs),
                                           "vocab_size": pairs.vocab_size})  # fmt: skip
    return directory


def _read_store(directory: Path) -> TokenPairs:
    path = directory / PAIRS_NAME
    pairs = TokenPairs()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise fail(path, f"line {n}: not valid JSON (truncated?): {e}") from None
            _add_entry(pairs, path, f"line {n}", entry, len(pairs))
    manifest = directory / MANIFEST_NAME
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise fail(manifest, f"not valid JSON ({e})") from None
        vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
        if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0):
            raise fail(manifest, f"vocab_size must be a positive int, found {vocab!r}")
        pairs.vocab_size = vocab
    return pairs


def read_pairs(path: str | Path) -> TokenPairs:
    """A reference JSON file, our store directory (pairs.jsonl + manifest.json), or a directory of JSON files
    (read in name order and concatenated)."""
    from specalign.runs import SETTINGS_FILE

    path = Path(path)
    if path.is_file():
        return read_reference_json(path)
    if not path.is_dir():
        raise fail(path, "token pairs not found")
    if (path / PAIRS_NAME).is_file():
        return _read_store(path)
    if (path / SETTINGS_FILE).is_file():
        raise fail(path, f"an unfinished run: no {PAIRS_NAME} yet (run the same extract command again to finish it)")
    files = reference_files(path)
    if not files:
        raise fail(path, f"no {PAIRS_NAME} and no JSON token files in this directory")
    pairs = TokenPairs()
    for f in files:
        pairs.extend(read_reference_json(f))
    return pairs


def reference_files(folder: Path) -> list[Path]:
    """The reference JSON token files of a folder: never a hidden file (a half-written temp file is one)."""
    return sorted(p for p in folder.glob("*.json") if p.name != MANIFEST_NAME and not p.name.startswith("."))


def pairs_identity(path: str | Path) -> dict:
    """What a token-pairs input is, for a resumable job's settings: its path and the hash of its content."""
    from specalign.runs import file_identity, sha256_file

    path = Path(path)
    if path.is_file():
        return file_identity(path)
    if (path / PAIRS_NAME).is_file():
        return {"path": str(path.resolve()), "sha256": sha256_file(path / PAIRS_NAME)}
    files = reference_files(path)
    return {"path": str(path.resolve()), "sha256": {p.name: sha256_file(p) for p in files}}


# ---------------------------------------------------------------- batching


def pad_batch(seqs: list[list[int]], pad_id: int = 0, length: int | None = None) -> torch.Tensor:
    """Right-pad token lists with `pad_id` (0, the reference's pad) -> LongTensor [B, L].

    L = `length` if given (longer sequences are truncated), else the longest sequence.
    """
    L = length if length is not None else max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:L]
        if s:
            out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out
