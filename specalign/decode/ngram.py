"""A text-only draft source: prompt lookup backed off to an n-gram table of the target's own answers.

    specalign ngram build --pairs runs/pairs_train --out runs/ngram.json      # build_ngram(NgramBuildConfig(...))
    specalign speculate ... --ngram runs/ngram.json                          # NgramDraft per answer

The baseline every feature-level draft must beat: it never looks at an image. At each drafted position the next
token comes from whichever of two guesses matched the longer context (up to n-1 tokens): prompt lookup, as in
transformers' prompt-lookup decoding (the longest suffix of prompt + accepted + drafted so far that occurred earlier
in that same sequence, and the token that followed its first occurrence), or the table's prediction after the
longest context it knows (back-off from n-1 tokens to 1); on a tie the table's (counted over many answers). With
neither, drafting stops (an empty proposal is allowed: the round is then a plain target step). Lookup first, whatever
its length, did worse on minidsec's demo world (table of 256 train answers, 64 test answers, gamma 6: tau 3.15
against 4.13): a one-token match overrode a seven-token context of the table.

The draft is deterministic, so its distribution q is one-hot on each proposed token (`Proposal.q = None`); under the
rule of Leviathan et al. that is valid for sampling too (a token x is accepted with probability p(x), a rejection
samples from p with x removed), so `NgramDraft` serves greedy and sampling alike.

Table file (JSON, no code): {"format": "specalign.ngram_table", "n", "sequences", "source",
"contexts": [rows of k + 2 ints per context length k = 1..n-1: the k context tokens, the next token, its count]}.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from specalign.decode.sources import DraftSource
from specalign.decode.speculative import Clock, Proposal, Stats
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import write_json
from specalign.options import option
from specalign.runs import require_positive

FORMAT = "specalign.ngram_table"
DEFAULT_N = 8


@dataclass
class NgramTable:
    """For each context length k = 1..n-1 and each k-token context seen in the answers: the most frequent next
    token (ties: the smallest id, so a build is deterministic) and how often it followed."""

    n: int
    next: list[dict[tuple[int, ...], tuple[int, int]]]  # next[k - 1][context of k tokens] = (token, count)
    sequences: int = 0  # answers it was built from
    source: dict | None = None  # the token pairs it was built from: {"path", "sha256"}

    @classmethod
    def build(cls, sequences: list[list[int]], n: int = DEFAULT_N, source: dict | None = None) -> NgramTable:
        require_positive("n", n, 2)
        counts = [dict() for _ in range(n - 1)]  # counts[k - 1][context] = Counter of next tokens
        for seq in sequences:
            for i in range(1, len(seq)):
                for k in range(1, min(n - 1, i) + 1):
                    counts[k - 1].setdefault(tuple(seq[i - k : i]), Counter())[seq[i]] += 1
        best = [{ctx: min(c.items(), key=lambda tc: (-tc[1], tc[0])) for ctx, c in level.items()} for level in counts]
        return cls(n, best, len(sequences), source)

    @property
    def contexts(self) -> int:
        return sum(len(level) for level in self.next)

    def max_token_id(self) -> int:
        """The largest token id the table holds (context or prediction); -1 when empty."""
        return max((max(*ctx, tok) for level in self.next for ctx, (tok, _) in level.items()), default=-1)

    def predict(self, seq: list[int]) -> tuple[int, int] | None:
        """The next token after `seq` from the longest known context -> (token, context length), or None."""
        for k in range(min(self.n - 1, len(seq)), 0, -1):
            hit = self.next[k - 1].get(tuple(seq[-k:]))
            if hit is not None:
                return hit[0], k
        return None

    # ---- file
    def to_json(self) -> dict:
        rows = [[[*ctx, tok, count] for ctx, (tok, count) in sorted(level.items())] for level in self.next]
        return {"format": FORMAT, "n": self.n, "sequences": self.sequences, "source": self.source, "contexts": rows}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            raise fail(path, "is a folder; give the table a file name (e.g. ngram.json)")
        try:
            write_json(path, self.to_json(), indent=None)  # temp file + rename: an old table is never half-replaced
        except OSError as e:
            raise fail(path, f"cannot write the n-gram table ({one_line(e)})") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> NgramTable:
        """Read and check a table file; anything wrong is one SpecalignError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise fail(path, "n-gram table not found" + (" (a folder; give the .json file)" if path.is_dir() else ""))
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise fail(path, f"not a readable n-gram table: not valid JSON (truncated?): {one_line(e)}") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise fail(path, f'not an n-gram table (no "format": "{FORMAT}"; build one with `specalign ngram build`)')
        n, rows = blob.get("n"), blob.get("contexts")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise fail(path, f"n must be an integer of at least 2, found {n!r}")
        if not isinstance(rows, list) or len(rows) != n - 1:
            found = len(rows) if isinstance(rows, list) else type(rows).__name__
            raise fail(path, f"expected {n - 1} context lengths for n = {n}, found {found}")
        levels = []
        for k, level in enumerate(rows, 1):
            if not isinstance(level, list):
                raise fail(path, f"contexts[{k - 1}]: expected a list of rows, found {type(level).__name__}")
            table = {}
            for j, row in enumerate(level):
                if (
                    not isinstance(row, list)
                    or len(row) != k + 2
                    or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in row)
                    or row[-1] < 1
                ):
                    raise fail(path, f"contexts[{k - 1}][{j}]: expected {k} context token ids, the next token id and "
                                     f"a count >= 1 (non-negative ints), found {row!r}"[:300])  # fmt: skip
                table[tuple(row[:k])] = (row[k], row[k + 1])
            levels.append(table)
        sequences = blob.get("sequences", 0)
        return cls(n, levels, sequences if isinstance(sequences, int) else 0, blob.get("source"))


def prompt_lookup(seq: list[int], max_len: int, min_len: int = 1) -> tuple[int, int] | None:
    """Prompt-lookup decoding's guess: the longest suffix of seq (min_len..max_len tokens) that also occurs earlier
    in seq, and the token after its first occurrence -> (token, suffix length), or None."""
    for size in range(min(max_len, len(seq) - 1), min_len - 1, -1):
        suffix = seq[-size:]
        for i in range(len(seq) - size):  # i + size < len(seq): the match is followed by a token
            if seq[i : i + size] == suffix:
                return seq[i + size], size
    return None


class NgramDraft(DraftSource):
    """A chain of up to gamma tokens from prompt lookup, backed off to the table (see the module docstring)."""

    name = "ngram"
    device = torch.device("cpu")

    def __init__(self, table: NgramTable, prompt: list[int], vocab_size: int, eos: int | None = None):
        """prompt: the target's prompt token ids (may be empty); ids outside 0..vocab_size-1 (visual placeholders)
        are dropped. vocab_size: the ids the target reads; a table token at or above it is never proposed. Drafting
        stops after proposing `eos`."""
        self.table, self.vocab_size, self.eos = table, vocab_size, eos
        self.prompt = [int(t) for t in prompt if 0 <= int(t) < vocab_size]
        self.sources = Counter()  # proposals per origin: "lookup" | "table" (what made the chain)

    def start(self, stats: Stats) -> None:
        pass

    def next_token(self, seq: list[int]) -> tuple[int, str] | None:
        """The next token after seq -> (token, "lookup" | "table"), or None: the guess with the longer context."""
        known = self.table.predict(seq)
        # lookup wins only with a longer match than the table's: search only those lengths (the per-round cost)
        looked = prompt_lookup(seq, self.table.n - 1, 1 if known is None else known[1] + 1)
        if looked is not None:
            known, origin = looked, "lookup"
        else:
            origin = "table"
        if known is None or known[0] >= self.vocab_size:
            return None
        return known[0], origin

    def propose(self, accepted: list[int], gamma: int, stats: Stats) -> Proposal:
        with Clock(self.device, stats.seconds, "draft", stats.sync):
            seq, tokens = self.prompt + list(accepted), []
            while len(tokens) < gamma:
                hit = self.next_token(seq + tokens)
                if hit is None:
                    break
                tokens.append(hit[0])
                self.sources[hit[1]] += 1
                if hit[0] == self.eos:
                    break
        return Proposal(tokens)  # q None: one-hot on each token (deterministic), valid for sampling too


@dataclass
class NgramBuildConfig:
    pairs: str = option(
        help="token pairs of the target's own answers (their vl_tokens): an extraction folder or a reference JSON"
    )
    out: str = option(help="the n-gram table to write (JSON)")
    n: int = option(DEFAULT_N, help="the longest n-gram: contexts of 1..n-1 tokens")

    def __post_init__(self):
        require_positive("n", self.n, 2)
        if not str(self.out).strip():
            raise SpecalignError("--out: empty path")


def build_ngram(cfg: NgramBuildConfig) -> dict:
    """Build the table from the target's answers in cfg.pairs and write it to cfg.out -> a summary (sequences,
    tokens, n, contexts, path)."""
    from specalign.align.tokens import pairs_identity, read_pairs

    out = Path(cfg.out)
    if out.is_dir():
        raise fail(out, "is a folder; give the table a file name (e.g. ngram.json)")
    pairs = read_pairs(cfg.pairs)
    answers = [seq for seq in pairs.target if seq]
    if not answers:
        raise fail(cfg.pairs, "no target answers (vl_tokens) to build an n-gram table from")
    table = NgramTable.build(answers, cfg.n, pairs_identity(cfg.pairs))
    table.save(out)
    summary = {"sequences": table.sequences, "tokens": sum(map(len, answers)), "n": table.n,
               "contexts": table.contexts, "path": str(out.resolve())}  # fmt: skip
    return summary
