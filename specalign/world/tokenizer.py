"""The shared BPE tokenizer of the mini world: one vocabulary for draft and target, as the real pair
(both Llama/Vicuna tokenizers) share one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from specalign.fsutil import atomic_path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>", "<event>"]
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)


def prompt_texts(questions: Iterable[str]) -> list[str]:
    """Both models' prompt templates around every question, so the newline and the markers get tokens."""
    out = []
    for q in questions:
        out.append(f"USER: <video>\n{q} ASSISTANT:")
        out.append(f"USER: <image>\n{q} ASSISTANT:")
        out.append(f"{SYSTEM} USER: <ev_start><event><ev_end>\n{q} ASSISTANT:")
    return out


def train_tokenizer(texts: Iterable[str], questions: Iterable[str], vocab_size: int = 1024):
    """A Metaspace (sentencepiece-style) BPE tokenizer trained on answers and prompts; ids 0..6 are the
    specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(sorted(set(texts)) + prompt_texts(sorted(set(questions))), trainer=trainer)
    return tok


def save_tokenizer(tok, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
