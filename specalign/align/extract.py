"""`specalign extract`: paired greedy generations of the draft and the target for every (sample, question).

Output folder (our token store, read by `align.tokens.read_pairs`):

    draft.rank<R>.jsonl / target.rank<R>.jsonl   append-only: one line per finished generation
    pairs.jsonl                                  the merged pairs, reference keys (egpt_* = draft, vl_* = target)
    manifest.json                                settings, counts, vocab sizes, timing, peak memory
    run_settings.json                            what makes the pairs (dataset index hash, questions, weight
                                                 stamps, ...): a re-run with other settings is refused
    hidden/<role>.rank<R>.<n>.safetensors        with --hidden-states: per finished batch, "<sample>_<question>"
                                                 -> last-layer hidden states [n_tokens, D] (`load_hidden_states`)

Every finished batch is appended and flushed before the next starts, so a killed run loses at most the batch in
flight; a re-run with the same settings skips what is on disk (a torn last line is ignored), so no pair is lost or
duplicated; one with other settings stops on one line naming the first difference (`overwrite` starts over).
One process writes a folder at a time (a lock); every input is checked before a model is loaded.
`--mode sequential` loads one model at a time (peak memory about one model's); `--mode parallel` loads both.
Under torchrun each rank takes every WORLD_SIZE-th job and writes its own files; rank 0 merges.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specalign.data import open_dataset
from specalign.decode.batch import generate_shared
from specalign.errors import SpecalignError, fail
from specalign.fsutil import atomic_path, ensure_dir, read_json, write_bytes, write_json
from specalign.models.base import Prompt
from specalign.options import option
from specalign.runs import OVERWRITE_HELP, require_positive, shared_run_folder

ROLES = ("draft", "target")


@dataclass
class ExtractConfig:
    dataset: str = option(help="a split folder")
    out: str = option(help="output folder (a re-run with the same settings resumes it)")
    draft: str = option("mini-draft", help="a bundled model name or a checkpoint directory")
    target: str = option("mini-target", help="a bundled model name or a checkpoint directory")
    questions: int = option(1, help="the first N questions of the {question, count} list")
    questions_file: str | None = option(None, help="a {question, count} JSON list (the reference format); "
                                        "default: the split's own questions")  # fmt: skip
    max_samples: int | None = option(None, help="only the first N samples of the split (default: all)")
    max_new_tokens: int = option(50, help="tokens generated per answer")
    batch_size: int = option(32, help="prompts per batch")
    mode: str = option("sequential", choices=("sequential", "parallel"),
                       help="sequential: one model in memory at a time; parallel: both loaded")  # fmt: skip
    device: str | None = option(None, help="cuda | cpu (default: cuda when available)")
    dtype: str | None = option(None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    hidden_states: bool = option(False, help="also store each token's last-layer hidden state of both models "
                                 "(hidden/*.safetensors)")  # fmt: skip
    engine: str = option("static", choices=("static", "hf"),
                         help="static: our static-cache engine, the visual prefix prefilled once per sample; "
                         "hf: transformers generate (used anyway with --hidden-states)")  # fmt: skip
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        for name in ("questions", "max_samples", "max_new_tokens", "batch_size"):
            require_positive(name, getattr(self, name))
        for name, allowed in (("mode", ("sequential", "parallel")), ("engine", ("static", "hf"))):
            if getattr(self, name) not in allowed:
                raise SpecalignError(f"--{name}: unknown {name} {getattr(self, name)!r}: choose {' or '.join(allowed)}")


HIDDEN_DIR = "hidden"
DEFAULT_QUESTION = "What are the key elements in this scene?"  # a split without a world's questions.json
# fields that change only speed, memory or where things go, never the pairs: a resume may change them
COSMETIC = ("out", "device", "mode", "batch_size", "overwrite", "dataset", "questions_file")


def load_questions(dataset, questions: int, questions_file: str | None = None) -> list[str]:
    """The first `questions` of a {question, count} JSON list (the reference's format), else of the split's own
    list; fewer than asked is refused (silently using fewer would make a different data set)."""
    require_positive("questions", questions)
    if questions_file:
        items = read_json(questions_file)
        if isinstance(items, dict) and "questions" in items:
            items = items["questions"]
        if not isinstance(items, list):
            raise fail(questions_file, "expected a list of {question, count} objects")
        qs = []
        for k, item in enumerate(items):
            q = item.get("question") if isinstance(item, dict) else item
            if not isinstance(q, str) or not q.strip():
                raise fail(questions_file, f"item {k}: expected a {{question, count}} object with the question as "
                                           f"text, found {item!r}"[:200])  # fmt: skip
            qs.append(q)
        where = f"{questions_file} holds"
    else:
        qs = [q["question"] for q in dataset.questions()] or [DEFAULT_QUESTION]
        where = f"the split {dataset.root} has"
    if not qs:
        raise fail(questions_file, "the question list is empty")
    if questions > len(qs):
        raise SpecalignError(
            f"--questions {questions}: {where} only {len(qs)} question{'s' * (len(qs) != 1)}"
            + ("" if questions_file else "; pass --questions-file with a {question, count} list")
        )
    return qs[:questions]


@dataclass
class Plan:
    """What one extraction will do, worked out from cheap checks only (no model loaded)."""

    dataset: object
    questions: list[str]
    samples: int
    settings: dict  # what makes the pairs: the folder refuses a resume with other settings


def plan(cfg: ExtractConfig) -> Plan:
    """Check the dataset, the questions and both models (no weights loaded), in the order a user would fix them."""
    from specalign.models import check_model, weights_stamp
    from specalign.runs import dataset_identity

    dataset = open_dataset(cfg.dataset)
    if not len(dataset):
        raise fail(cfg.dataset, "the split has no samples")
    questions = load_questions(dataset, cfg.questions, cfg.questions_file)
    check_model(cfg.draft, "--draft")
    check_model(cfg.target, "--target")
    n = len(dataset) if cfg.max_samples is None else min(cfg.max_samples, len(dataset))
    settings = {k: v for k, v in asdict(cfg).items() if k not in COSMETIC}
    settings.update(dataset=dataset_identity(cfg.dataset), samples=n, questions=questions,
                    weights={r: weights_stamp(getattr(cfg, r)) for r in ROLES})  # fmt: skip
    return Plan(dataset, questions, n, settings)


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _done(path: Path) -> dict[tuple[int, int], dict]:
    """Finished records of one shard file; a torn last line (killed mid-write) is dropped."""
    out = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[(r["sample_idx"], r["question_idx"])] = r
    return out


def _done_role(out: Path, role: str) -> dict[tuple[int, int], dict]:
    """Finished records of one role over every rank's shard (a resume may run with another number of ranks)."""
    done = {}
    for shard in sorted(out.glob(f"{role}.rank*.jsonl")):
        done.update(_done(shard))
    return done


def _generate_role(vlm, role: str, dataset, questions, jobs, shard: Path, cfg: ExtractConfig, progress: bool):
    done = _done(shard)
    finished = _done_role(shard.parent, role)
    todo = [j for j in jobs if j not in finished]
    if shard.exists() and todo:  # rewrite without a torn tail before appending
        write_bytes(shard, "".join(json.dumps(r) + "\n" for r in done.values()).encode())
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"extract {role}", unit="pair",
               disable=not progress)  # fmt: skip
    engines: dict = {}
    with open(shard, "a") as f:
        for chunk in _chunks(todo, cfg.batch_size, len(questions)):
            prompts, visual = [], {}
            for s_idx, q_idx in chunk:
                if s_idx not in visual:  # the visual input is shared by all questions of a sample
                    visual[s_idx] = vlm.visual_inputs(dataset[s_idx])
                text = vlm.prompt_text(questions[q_idx])
                prompts.append(Prompt(vlm.expand_prompt(text, visual[s_idx]), visual[s_idx], text))
            hidden_file = None
            if cfg.engine == "static" and not cfg.hidden_states:
                groups: dict[int, list] = {}
                for (s_idx, _), p in zip(chunk, prompts, strict=True):
                    groups.setdefault(s_idx, []).append(p)
                outs = [a for answers in generate_shared(vlm, list(groups.values()), cfg.max_new_tokens, engines)
                        for a in answers]  # fmt: skip
            elif cfg.hidden_states:
                outs, feats = vlm.generate(prompts, max_new_tokens=cfg.max_new_tokens, return_hidden=True)
                # written (atomically) before the lines that point at it: a kill never leaves a dangling name
                hidden_file = _write_hidden(shard.parent, shard.stem, chunk, feats)
            else:
                outs = vlm.generate(prompts, max_new_tokens=cfg.max_new_tokens)
            for (s_idx, q_idx), ids in zip(chunk, outs, strict=True):
                rec = {"sample_idx": s_idx, "question_idx": q_idx, "sample_id": dataset[s_idx].id,
                       "query": questions[q_idx], "tokens": ids, "text": vlm.decode(ids)}  # fmt: skip
                if hidden_file:
                    rec["hidden_file"] = hidden_file
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    bar.close()


def _chunks(todo: list[tuple[int, int]], batch_size: int, questions: int):
    """Batches of whole samples (all their questions together, so their shared prefix is encoded once), about
    batch_size jobs each; a sample left half-done by a killed run simply makes a smaller group."""
    per = max(1, batch_size // questions)
    by_sample: dict[int, list] = {}
    for job in todo:
        by_sample.setdefault(job[0], []).append(job)
    samples = list(by_sample.values())
    for b in range(0, len(samples), per):
        yield [job for jobs in samples[b : b + per] for job in jobs]


def _write_hidden(out: Path, stem: str, chunk, feats) -> str:
    """One safetensors file per finished batch: key "<sample_idx>_<question_idx>" -> [n_tokens, D]."""
    from safetensors.torch import save_file

    folder = ensure_dir(out / HIDDEN_DIR)
    n = len(list(folder.glob(f"{stem}.*.safetensors")))
    name = f"{HIDDEN_DIR}/{stem}.{n:06d}.safetensors"
    tensors = {f"{s}_{q}": h.contiguous() for (s, q), h in zip(chunk, feats, strict=True)}
    with atomic_path(out / name) as tmp:
        save_file(tensors, str(tmp))
    return name


def load_hidden_states(out: str | Path, role: str) -> dict[tuple[int, int], torch.Tensor]:
    """{(sample_idx, question_idx): last-layer hidden states [n_tokens, D]} of one role ("draft" or "target") of
    an extraction run with --hidden-states; row i is the feature token i was predicted from."""
    from safetensors import safe_open

    if role not in ROLES:
        raise SpecalignError(f"role must be one of {ROLES}, got {role!r}")
    out = Path(out)
    result = {}
    for line in (out / "pairs.jsonl").read_text().splitlines():
        rec = json.loads(line)
        name = rec.get(f"{role}_hidden_file")
        if name is None:
            raise fail(out / "pairs.jsonl", "no hidden states in this run (extract with --hidden-states)")
        with safe_open(str(out / name), framework="pt") as f:
            result[(rec["sample_idx"], rec["question_idx"])] = f.get_tensor(
                f"{rec['sample_idx']}_{rec['question_idx']}"
            )
    return result


def _peak_memory_gb(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)


def extract(cfg: ExtractConfig, progress: bool = True) -> dict:
    """Run (or resume) an extraction; returns the manifest. Every input is checked before a model is loaded; a
    folder holding a run with other settings is refused (or, with overwrite, cleared)."""
    from specalign.models import load_model

    p = plan(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = _rank()
    if world > 1:  # torchrun / accelerate launch: one process per GPU; rank 0 merges once every rank is done
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")  # only for the barriers
    out = Path(cfg.out)
    with shared_run_folder(out, p.settings, cfg.overwrite, rank, world):  # rank 0 holds it for the whole run
        return _extract(cfg, p, out, device, rank, world, load_model, progress)


def _extract(cfg: ExtractConfig, p: Plan, out: Path, device: str, rank: int, world: int, load_model, progress):
    every = [(s, q) for s in range(p.samples) for q in range(len(p.questions))]
    jobs = every[rank::world]
    previous = out / "manifest.json"
    if previous.exists() and all(set(every) <= set(_done_role(out, r)) for r in ROLES):
        return read_json(previous)  # the same run finished before: nothing to load
    t0 = time.time()
    names = {"draft": cfg.draft, "target": cfg.target}
    vocab = {}
    if cfg.mode == "parallel":
        models = {r: load_model(names[r], device=device, dtype=cfg.dtype) for r in ROLES}
    for role in ROLES:
        vlm = models[role] if cfg.mode == "parallel" else load_model(names[role], device=device, dtype=cfg.dtype)
        vocab[role] = vlm.vocab_size
        _generate_role(vlm, role, p.dataset, p.questions, jobs, out / f"{role}.rank{rank}.jsonl", cfg, progress)
        if cfg.mode == "sequential":
            del vlm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    seconds = time.time() - t0
    manifest = {"settings": {**asdict(cfg), "device": device}, "dataset": p.settings["dataset"],
                "questions": p.questions, "samples": p.samples, "world_size": world,
                "vocab_size": max(vocab.values()), "vocab_sizes": vocab, "seconds_rank0": round(seconds, 1),
                "peak_memory_gb": round(_peak_memory_gb(device), 3)}  # fmt: skip
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        manifest["pairs"] = merge(out)
        write_json(out / "manifest.json", manifest)
    return manifest


def summary_line(m: dict, out: str | Path) -> str:
    """The console line of a finished extraction."""
    return (f"{m['pairs']} pairs in {Path(out) / 'pairs.jsonl'}  ({m['samples']} samples x {len(m['questions'])} "
            f"questions, {m['seconds_rank0']} s, peak memory {m['peak_memory_gb']} GB)")  # fmt: skip


def merge(out: Path) -> int:
    """Join the draft and target shards of every rank into pairs.jsonl (reference keys); returns the count."""
    records = {r: _done_role(Path(out), r) for r in ROLES}
    keys = sorted(set(records["draft"]) & set(records["target"]))
    lines = []
    for k in keys:
        d, t = records["draft"][k], records["target"][k]
        lines.append(json.dumps({"sample_idx": k[0], "question_idx": k[1], "sample_id": d["sample_id"],
                                 "query": d["query"], "egpt_tokens": d["tokens"], "egpt_text": d["text"],
                                 "vl_tokens": t["tokens"], "vl_text": t["text"],
                                 **({"draft_hidden_file": d["hidden_file"], "target_hidden_file": t["hidden_file"]}
                                    if "hidden_file" in d and "hidden_file" in t else {})}) + "\n")  # fmt: skip
    write_bytes(Path(out) / "pairs.jsonl", "".join(lines).encode())
    return len(keys)
