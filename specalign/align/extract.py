"""`specalign extract`: paired greedy generations of the draft and the target for every (sample, question).

Output folder (our token store, read by `align.tokens.read_pairs`):

    draft.rank<R>.jsonl / target.rank<R>.jsonl   append-only: one line per finished generation
    pairs.jsonl                                  the merged pairs, reference keys (egpt_* = draft, vl_* = target)
    manifest.json                                settings, counts, vocab sizes, timing, peak memory
    run_settings.json                            what makes the pairs (dataset index hash, questions, weight
                                                 stamps, ...): a re-run with other settings is refused
    features/                                    with --hidden-states: teacher-forced features of both models
                                                 over the target's answers, safetensors per finished batch, an
                                                 index and meta.json (`align.features`: layout and `FeatureStore`)

Every finished batch is appended and flushed before the next starts, so a killed run loses at most the batch in
flight; a re-run with the same settings skips what is on disk (a torn last line is ignored), so no pair is lost or
duplicated; one with other settings stops on one line naming the first difference (`overwrite` starts over).
One process writes a folder at a time (a lock); every input is checked before a model is loaded.
`--mode sequential` loads one model at a time (peak memory about one model's); `--mode parallel` loads both.
With --hidden-states the target goes first: it generates, then runs its feature pass over its own answers while it
is loaded; then the draft generates and runs its feature pass over the target's answers.
Under torchrun each rank takes every WORLD_SIZE-th job and writes its own files; rank 0 merges.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specalign.align.features import (
    FEATURES_DIR,
    FeatureWriter,
    batch_tensors,
    draft_features,
    fused_layers,
    model_info,
    read_index,
    target_features,
    write_meta,
)
from specalign.data import open_dataset
from specalign.decode.batch import generate_shared
from specalign.errors import SpecalignError, fail
from specalign.fsutil import read_json, write_bytes, write_json
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
    hidden_states: bool = option(False, help="also store features for draft heads (features/): the target's final "
                                 "state over its prompt text and answer, the draft's over its prompt and the "
                                 "target's answer, the draft's event tokens")  # fmt: skip
    hidden_layers: bool = option(False, help="with --hidden-states: also the target's low, middle and high decoder "
                                 "layers (EAGLE-3)")  # fmt: skip
    engine: str = option("static", choices=("static", "hf"),
                         help="static: our static-cache engine, the visual prefix prefilled once per sample; "
                         "hf: transformers generate")  # fmt: skip
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        for name in ("questions", "max_samples", "max_new_tokens", "batch_size"):
            require_positive(name, getattr(self, name))
        for name, allowed in (("mode", ("sequential", "parallel")), ("engine", ("static", "hf"))):
            if getattr(self, name) not in allowed:
                raise SpecalignError(f"--{name}: unknown {name} {getattr(self, name)!r}: choose {' or '.join(allowed)}")
        if self.hidden_layers and not self.hidden_states:
            raise SpecalignError("--hidden-layers: needs --hidden-states (the layers are stored with the features)")


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
    shared_vocab: int | None = None  # with --hidden-states: target ids the draft reads as they are (`shared_ids`)


def plan(cfg: ExtractConfig) -> Plan:
    """Check the dataset, the questions and both models (no weights loaded), in the order a user would fix them."""
    from specalign.models import check_model, weights_stamp
    from specalign.runs import dataset_identity

    dataset = open_dataset(cfg.dataset)
    if not len(dataset):
        raise fail(cfg.dataset, "the split has no samples")
    questions = load_questions(dataset, cfg.questions, cfg.questions_file)
    draft = check_model(cfg.draft, "--draft")
    target = check_model(cfg.target, "--target")
    shared = None
    if cfg.hidden_states:  # the draft's feature pass reads the target's answers: their ids must mean the same
        from specalign.decode.sources import shared_ids

        shared = shared_ids(draft["tokenizer"], target["tokenizer"], draft["vocab_size"], target["vocab_size"],
                            cfg.draft, cfg.target)  # fmt: skip
    n = len(dataset) if cfg.max_samples is None else min(cfg.max_samples, len(dataset))
    settings = {k: v for k, v in asdict(cfg).items() if k not in COSMETIC}
    settings.update(dataset=dataset_identity(cfg.dataset), samples=n, questions=questions,
                    weights={r: weights_stamp(getattr(cfg, r)) for r in ROLES})  # fmt: skip
    return Plan(dataset, questions, n, settings, shared)


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
        for chunk, prompts in _prepared(vlm, dataset, questions, _chunks(todo, cfg.batch_size, len(questions))):
            if cfg.engine == "static":
                groups: dict[int, list] = {}
                for (s_idx, _), p in zip(chunk, prompts, strict=True):
                    groups.setdefault(s_idx, []).append(p)
                outs = [a for answers in generate_shared(vlm, list(groups.values()), cfg.max_new_tokens, engines)
                        for a in answers]  # fmt: skip
            else:
                outs = vlm.generate(prompts, max_new_tokens=cfg.max_new_tokens)
            for (s_idx, q_idx), ids in zip(chunk, outs, strict=True):
                rec = {"sample_idx": s_idx, "question_idx": q_idx, "sample_id": dataset[s_idx].id,
                       "query": questions[q_idx], "tokens": ids, "text": vlm.decode(ids)}  # fmt: skip
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    bar.close()


def _prepared(vlm, dataset, questions, chunks):
    """(chunk, the model's prompts of its (sample, question) jobs) for each chunk. The visual input is built once
    per sample, on a pool of threads, one chunk ahead of the caller: reading and resizing images (which release
    the GIL) overlaps the model's work on the chunk before."""

    def start(chunk):
        samples = dict.fromkeys(s for s, _ in chunk)  # the visual input is shared by all questions of a sample
        return chunk, {s: pool.submit(vlm.visual_inputs, dataset[s]) for s in samples}

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        ahead = None
        for chunk in chunks:
            current, ahead = ahead, start(chunk)
            if current:
                yield _prompts(vlm, questions, *current)
        if ahead:
            yield _prompts(vlm, questions, *ahead)


def _prompts(vlm, questions, chunk, visual_futures) -> tuple[list, list[Prompt]]:
    visual = {s: f.result() for s, f in visual_futures.items()}  # a bad sample's error is raised here
    prompts = []
    for s_idx, q_idx in chunk:
        text = vlm.prompt_text(questions[q_idx])
        prompts.append(Prompt(vlm.expand_prompt(text, visual[s_idx]), visual[s_idx], text))
    return chunk, prompts


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
    if (
        previous.exists()
        and all(set(every) <= set(_done_role(out, r)) for r in ROLES)
        and (not cfg.hidden_states or all(set(every) <= set(done) for done in read_index(out / FEATURES_DIR).values()))
    ):
        return read_json(previous)  # the same run finished before: nothing to load
    t0 = time.time()
    names = {"draft": cfg.draft, "target": cfg.target}
    # the draft's feature pass reads the target's answers: the target goes first
    order = ("target", "draft") if cfg.hidden_states else ROLES
    vocab, info, feature_seconds = {}, {}, {}
    if cfg.mode == "parallel":
        models = {r: load_model(names[r], device=device, dtype=cfg.dtype) for r in order}
    for role in order:
        vlm = models[role] if cfg.mode == "parallel" else load_model(names[role], device=device, dtype=cfg.dtype)
        vocab[role] = vlm.vocab_size
        _generate_role(vlm, role, p.dataset, p.questions, jobs, out / f"{role}.rank{rank}.jsonl", cfg, progress)
        if cfg.hidden_states:
            info[role] = model_info(vlm)
            feature_seconds[role] = _feature_role(vlm, role, p, jobs, out, rank, cfg, progress)
        if cfg.mode == "sequential":
            del vlm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    seconds = time.time() - t0
    manifest = {"settings": {**asdict(cfg), "device": device}, "dataset": p.settings["dataset"],
                "questions": p.questions, "samples": p.samples, "world_size": world,
                "vocab_size": max(vocab.values()), "vocab_sizes": vocab, "seconds_rank0": round(seconds, 1),
                "peak_memory_gb": round(_peak_memory_gb(device), 3)}  # fmt: skip
    if cfg.hidden_states:
        manifest["feature_seconds_rank0"] = {r: round(t, 2) for r, t in feature_seconds.items()}
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        manifest["pairs"] = merge(out)
        if cfg.hidden_states:
            layers = fused_layers(info["target"]["n_layers"]) if cfg.hidden_layers else None
            meta = write_meta(out / FEATURES_DIR, info, layers, p.shared_vocab, p.samples, len(p.questions))
            manifest["features"] = meta["records"]
        write_json(out / "manifest.json", manifest)
    return manifest


def _feature_role(vlm, role: str, p: Plan, jobs, out: Path, rank: int, cfg: ExtractConfig, progress: bool) -> float:
    """One role's teacher-forced feature pass over the target's answers of `jobs`, one safetensors file per
    finished batch (resumable: what the index lists is skipped). Returns its seconds."""
    writer = FeatureWriter(out / FEATURES_DIR, role, rank)
    todo = [j for j in jobs if j not in writer.done]
    answers = {k: r["tokens"] for k, r in _done_role(out, "target").items()}
    layers = fused_layers(model_info(vlm)["n_layers"]) if role == "target" and cfg.hidden_layers else None
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"features {role}", unit="pair",
               disable=not progress)  # fmt: skip
    t0 = time.time()
    for chunk, prompts in _prepared(vlm, p.dataset, p.questions, _chunks(todo, cfg.batch_size, len(p.questions))):
        a = [answers[j] for j in chunk]
        if role == "target":
            feats = target_features(vlm, prompts, a, layers)
        else:
            feats = draft_features(vlm, prompts, a, min(p.shared_vocab, vlm.vocab_size))
        writer.write(*batch_tensors(role, chunk, feats, a))
        bar.update(len(chunk))
    bar.close()
    return time.time() - t0


def summary_line(m: dict, out: str | Path) -> str:
    """The console line of a finished extraction."""
    line = (f"{m['pairs']} pairs in {Path(out) / 'pairs.jsonl'}  ({m['samples']} samples x {len(m['questions'])} "
            f"questions, {m['seconds_rank0']} s, peak memory {m['peak_memory_gb']} GB)")  # fmt: skip
    if "features" in m:
        line += f"\nfeatures of {m['features']} answers in {Path(out) / FEATURES_DIR}"
    return line


def merge(out: Path) -> int:
    """Join the draft and target shards of every rank into pairs.jsonl (reference keys); returns the count."""
    records = {r: _done_role(Path(out), r) for r in ROLES}
    keys = sorted(set(records["draft"]) & set(records["target"]))
    lines = []
    for k in keys:
        d, t = records["draft"][k], records["target"][k]
        lines.append(json.dumps({"sample_idx": k[0], "question_idx": k[1], "sample_id": d["sample_id"],
                                 "query": d["query"], "egpt_tokens": d["tokens"], "egpt_text": d["text"],
                                 "vl_tokens": t["tokens"], "vl_text": t["text"]}) + "\n")  # fmt: skip
    write_bytes(Path(out) / "pairs.jsonl", "".join(lines).encode())
    return len(keys)
