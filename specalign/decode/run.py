"""`specalign speculate`: speculative decoding over a split and its questions, measured against the target alone.

For every (sample, question): the target alone on the static-cache engine (the baseline of every speedup) and SD
with the chosen draft source, each timed `repeats` times in alternating order (the median is kept), and HF
`generate` (the reference's path) once. All inputs are checked before any model loads: the values, the dataset and
its questions, the TokenAdapter, both models, and that --out is writable and holds no run of other settings.
Writes to --out: results.json (config, resolved paths, verdict, totals, per answer: sd_tokens, target_tokens,
alpha, tau, times), BENCHMARK_RESULTS.md, timing_breakdown.png, acceptance_histogram.png, speedup.png.

The verdict: greedy SD must give the target-alone tokens exactly; sampling SD follows the rule of Leviathan et al.,
which preserves the target's distribution, not its tokens, so it gets a two-sample test of that distribution on
one prompt instead (`check_draws`).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specalign.decode.engine import ENGINES, Engine, engine_options, prompt_embeds
from specalign.decode.ngram import NgramDraft, NgramTable
from specalign.decode.sources import AdaptedDraft, VLMDraft, shared_ids, shared_vocabulary
from specalign.decode.speculative import Clock, divergence, speculative_decode, target_generate
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import save_png, write_bytes, write_json
from specalign.models.base import Sampling
from specalign.options import option
from specalign.runs import (
    LOCK_FILE,
    OVERWRITE_HELP,
    SETTINGS_FILE,
    check_settings,
    dataset_identity,
    exclusive,
    file_identity,
    require_positive,
)

STAGES = ("vision", "prefill", "draft", "adapt", "verify")
# fewer answers or less SD time than this: the speedup is reported with a warning (timer noise and warm-up dominate)
SHORT_RUN_ANSWERS, SHORT_RUN_SECONDS = 10, 1.0
CHECK_ALPHA = 0.01  # the distribution check fails below this p-value (Bonferroni over the positions compared)
# fields that change how a run is executed or named, not its results: left out of the settings a folder holds
NOT_SETTINGS = ("out", "overwrite", "device", "draft_device", "target_device")


@dataclass
class SpeculateConfig:
    dataset: str = option(help="a split folder")
    out: str = option(help="results folder (results.json, BENCHMARK_RESULTS.md, plots)")
    draft: str = option("mini-draft", help="a bundled model name or a checkpoint directory")
    target: str = option("mini-target", help="a bundled model name or a checkpoint directory")
    questions: int = option(1, help="the first N questions of the {question, count} list")
    questions_file: str | None = option(None, help="a {question, count} JSON list (the reference format)")
    max_samples: int | None = option(None, help="use the first N samples of the split (default: all)")
    gamma: int = option(4, help="draft tokens per round")
    min_confidence: float = option(
        0.0, help="adaptive gamma: stop drafting when the draft's probability falls below this (0: off)"
    )
    max_new_tokens: int = option(50, help="tokens to generate per answer")
    token_adapter: str | None = option(
        None,
        help="map the draft's proposals through this TokenAdapter: a best_model/ folder, a task folder, or a folder "
        "of task folders (its `latest` task)",
    )
    adapter_resync: bool = option(
        False, help="map the resynced draft's per-round proposals (default: its own whole answer, as trained)"
    )
    ngram: str | None = option(
        None,
        help="draft from this n-gram table (`specalign ngram build`) instead of the draft VLM: a text-only baseline",
    )
    draft_head: str | None = option(
        None,
        help="draft with this head on the target's features: `mini-head` (bundled, for mini-target), or a "
        "`specalign train-head` best_model/ folder, task folder or folder of task folders: eagle and eagle+events "
        "heads, or a feature-adapter (the cascade draft VLM -> adapter -> the target's LM head)",
    )
    tree: str | None = option(
        None,
        help="TOPK,DEPTH,NODES: an eagle head drafts a dynamic tree (EAGLE-2; e.g. 10,6,60) verified in one forward; "
        "greedy only; DEPTH replaces --gamma",
    )
    temperature: float = option(0.0, help="0 = greedy; > 0 samples (with --top-p and --seed)")
    top_p: float = option(1.0, help="nucleus sampling mass in (0, 1] (sampling only)")
    seed: int = option(0, help="random seed of the sampling")
    check_draws: int = option(
        200,
        help="sampling only: answers drawn per side (target alone, SD) on one prompt to test that SD follows the "
        "target's distribution (0: no test)",
    )
    repeats: int = option(3, help="time the target alone and SD this many times per answer (the median is kept)")
    device: str | None = option(None, help="cuda | cpu (default: cuda when available)")
    draft_device: str | None = option(None, help="e.g. cuda:1: the draft on its own GPU (default: --device)")
    target_device: str | None = option(None, help="e.g. cuda:0 (default: --device)")
    hide_prefill: bool = option(
        False,
        help="the draft VLM drafts while the target prefills; with an eagle --draft-head, the hybrid: the draft VLM "
        "drafts the first round during the prefill and the head every round after",
    )
    prefill_draft: int | None = option(None, help="with --hide-prefill: tokens the draft VLM drafts while the "
                                       "target prefills, its guess of the target's first token included "
                                       "(default: gamma + 1); fewer fit a draft whose steps would outlast the "
                                       "prefill")  # fmt: skip
    dtype: str | None = option(None, help="bf16 | fp16 | fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    hf_baseline: bool = option(True, help="also time HF generate (the reference's path)")
    # bf16 ties broke greedy SD apart on the H200: a tie may break differently in a verify than in a decode step
    fp32_head: bool = option(
        True,
        help="the target's logits from an fp32 LM head: bf16 logits tie now and then, and a tie may break "
        "differently in a verify than in a decode step on a GPU",
    )
    engine: str = option(
        "graphs",
        help="the target's engine (`decode.engine.ENGINES`): graphs (CUDA graphs over the model's modules), split "
        "(split-KV attention, verify blocks fused and compiled) or gemv (split, and the one-token step as Triton "
        "GEMV kernels: Llama layers); the fastest at 7B shape is gemv (docs/benchmarks.md)",
    )
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        from specalign.models.loading import resolve_dtype

        for name in ("max_new_tokens", "gamma", "questions", "max_samples", "repeats"):
            require_positive(name, getattr(self, name))
        require_positive("check_draws", self.check_draws, 0)
        if self.prefill_draft is not None:
            require_positive("prefill_draft", self.prefill_draft, 2)  # its first token is only a guess
            if not self.hide_prefill:
                raise SpecalignError("--prefill-draft: sets what the draft drafts under --hide-prefill; add it")
        if self.engine not in ENGINES:
            raise SpecalignError(f"--engine: unknown {self.engine!r}: choose {', '.join(ENGINES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise SpecalignError(f"--seed: must be an integer in [0, 2^32), got {self.seed!r}")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # also refuses NaN
            raise SpecalignError(f"--temperature: must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpecalignError(f"--top-p: must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if not 0 <= self.min_confidence < 1:
            raise SpecalignError(f"--min-confidence: must be in [0, 1) (0 turns adaptive gamma off), "
                                 f"got {self.min_confidence}")  # fmt: skip
        if self.token_adapter is not None and not str(self.token_adapter).strip():
            raise SpecalignError("--token-adapter: empty path")
        if self.draft_head is not None:
            if not str(self.draft_head).strip():
                raise SpecalignError("--draft-head: empty path")
            for flag, value in (("--token-adapter", self.token_adapter), ("--ngram", self.ngram)):
                if value:
                    raise SpecalignError(f"--draft-head: cannot be combined with {flag} (one draft source at a time)")
            if self.min_confidence > 0:
                raise SpecalignError("--draft-head: adaptive gamma (--min-confidence) is for the draft VLM")
        if self.tree is not None:
            from specalign.decode.heads import TreeShape

            shape = TreeShape.parse(self.tree)
            if not self.draft_head:
                raise SpecalignError("--tree: needs --draft-head (trees are drafted by a head)")
            if not self.greedy:
                raise SpecalignError("--tree: draft trees are greedy only (sampling needs the multi-draft rejection "
                                     "rule); drop --tree or use --temperature 0")  # fmt: skip
            self.gamma = shape.depth
        if self.ngram is not None:
            if not str(self.ngram).strip():
                raise SpecalignError("--ngram: empty path")
            if self.token_adapter:
                raise SpecalignError("--ngram: cannot be combined with --token-adapter (it drafts without the VLM)")
            if self.min_confidence > 0:
                raise SpecalignError("--ngram: adaptive gamma (--min-confidence) needs the draft VLM's probabilities")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        for name in ("device", "draft_device", "target_device"):
            _check_device(name, getattr(self, name))
        resolve_dtype(self.dtype)  # refuses an unknown --dtype

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_device(name: str, device: str | None) -> None:
    if device is None:
        return
    flag = "--" + name.replace("_", "-")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpecalignError(f"{flag}: {device!r} is not a device; use cuda, cuda:N or cpu") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecalignError(f"{flag}: {device}: no CUDA GPU is available here (use cpu)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise SpecalignError(f"{flag}: {device}: only {torch.cuda.device_count()} GPU(s) here")
    elif d.type != "cpu":
        raise SpecalignError(f"{flag}: {device!r} is not a device; use cuda, cuda:N or cpu")


# ---------------------------------------------------------------- inputs, checked before any model loads


@dataclass
class Inputs:
    """What the config's paths resolve to, and the identities that decide whether a results folder matches."""

    dataset: object
    questions: list[str]
    paths: dict  # every resolved path: dataset, questions_file, draft, target, token_adapter, out
    settings: dict  # for runs.check_settings: the config minus NOT_SETTINGS, plus input identities
    ngram: object = None  # the loaded decode.ngram.NgramTable of --ngram
    head_kind: str | None = None  # the --draft-head's kind (eagle, eagle+events, feature-adapter)

    hybrid: bool = False  # --hide-prefill with an eagle head: the draft VLM drafts the first round

    @property
    def needs_draft_vlm(self) -> bool:
        """The draft VLM runs for its own proposals, the adapters', the event tokens of an eagle+events head and the
        hybrid's first round."""
        return self.ngram is None and (self.head_kind != "eagle" or self.hybrid)


def check_inputs(cfg: SpeculateConfig) -> Inputs:
    """Every input, cheapest first; raises SpecalignError on the first bad one. Nothing is written."""
    from specalign.align.extract import load_questions
    from specalign.align.token_adapter import WEIGHTS_NAME, load_adapter
    from specalign.data import open_dataset
    from specalign.evaluate.adapter import resolve_adapter
    from specalign.models import check_model, weights_stamp
    from specalign.models.loading import resolve_dtype

    dataset = open_dataset(cfg.dataset)
    if len(dataset) == 0:
        raise fail(dataset.root, "the split has no samples")
    questions = load_questions(dataset, cfg.questions, cfg.questions_file)
    adapter_path = adapter_id = None
    if cfg.token_adapter:
        adapter_path = resolve_adapter(cfg.token_adapter).resolve()
        load_adapter(adapter_path)  # read and shape-checked here; moved to its device after the models load
        adapter_id = file_identity(adapter_path / WEIGHTS_NAME if adapter_path.is_dir() else adapter_path)
    table = None
    if cfg.ngram:
        table = NgramTable.load(cfg.ngram)
    head_path = head_kind = None
    if cfg.draft_head:
        from specalign.align.heads import CONFIG_NAME, read_head_config
        from specalign.models.registry import BUNDLED_HEADS
        from specalign.runs import resolve_best_model

        name = BUNDLED_HEADS.get(cfg.draft_head, cfg.draft_head)
        head_path = resolve_best_model(name, lambda p: (p / CONFIG_NAME).is_file(), "draft head").resolve()
        head_kind = read_head_config(head_path).kind
        if cfg.tree and head_kind == "feature-adapter":
            raise fail(head_path, "a feature-adapter drafts through the draft VLM, one token at a time: no --tree")
    draft_info, target_info = check_model(cfg.draft, "--draft"), check_model(cfg.target, "--target")
    if head_path is not None:
        from specalign.align.heads import check_head

        check_head(head_path, target_info)  # a head trained for another target, before any model loads
    if table is not None and table.max_token_id() >= target_info["vocab_size"]:
        raise fail(cfg.ngram, f"holds token id {table.max_token_id()}, outside the target's vocabulary of "
                              f"{target_info['vocab_size']}: a table built for another target?")  # fmt: skip
    shared_ids(draft_info["tokenizer"], target_info["tokenizer"], draft_info["vocab_size"], target_info["vocab_size"],
               cfg.draft, cfg.target)  # two tokenizers that disagree are refused before any model loads  # fmt: skip
    paths = {
        "dataset": str(dataset.root),
        "questions_file": str(Path(cfg.questions_file).resolve()) if cfg.questions_file else None,
        "draft": draft_info["path"],
        "target": target_info["path"],
        "token_adapter": str(adapter_path) if adapter_path else None,
        "ngram": str(Path(cfg.ngram).resolve()) if cfg.ngram else None,
        "draft_head": str(head_path) if head_path else None,
        "out": str(Path(cfg.out).resolve()),
    }
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
    settings.update(
        dataset=dataset_identity(dataset.root),
        questions_file=file_identity(cfg.questions_file) if cfg.questions_file else None,
        question_list=questions,
        dtype=str(resolve_dtype(cfg.dtype, cfg.target_device or cfg.device)).removeprefix("torch."),
        draft_weights=weights_stamp(cfg.draft),
        target_weights=weights_stamp(cfg.target),
        token_adapter=adapter_id,
        ngram=file_identity(cfg.ngram) if cfg.ngram else None,
        draft_head=_head_identity(head_path) if head_path else None,
    )
    hybrid = bool(cfg.hide_prefill and head_kind in ("eagle", "eagle+events"))
    return Inputs(dataset, questions, paths, settings, table, head_kind, hybrid)


def _head_identity(path: Path) -> dict:
    from specalign.align.heads import WEIGHTS_NAME

    return file_identity(path / WEIGHTS_NAME)


@contextmanager
def results_folder(out: str | Path, settings: dict, overwrite: bool):
    """--out, locked for the run and holding these settings (a folder with another run's results is refused
    unless overwrite). A run that fails before writing its results leaves the folder as it found it."""
    out = Path(out)
    created, had_lock = not out.exists(), (out / LOCK_FILE).exists()
    done = new = False
    try:
        with exclusive(out) as folder:  # mkdir -p and the lock: an unwritable place fails here, on one line
            try:
                new = check_settings(folder, settings, overwrite)
            except OSError as e:
                raise fail(out, f"cannot write the results here ({one_line(e)})") from None
            yield folder
            done = True
    finally:
        if not done and out.is_dir() and not (out / "results.json").exists():
            if new:
                (out / SETTINGS_FILE).unlink(missing_ok=True)
            if not had_lock:
                (out / LOCK_FILE).unlink(missing_ok=True)
            if created:
                with suppress(OSError):  # not empty: something else is in it
                    out.rmdir()


# ---------------------------------------------------------------- the run


def _seed(*parts: int) -> int:
    """A fixed seed for one draw, stable across runs and distinct for each tuple of parts."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_speculate(cfg: SpeculateConfig, progress: bool = True) -> dict:
    from specalign.align.token_adapter import load_adapter
    from specalign.models import load_model

    inputs = check_inputs(cfg)
    with results_folder(cfg.out, inputs.settings, cfg.overwrite) as out:
        target = load_model(cfg.target, device=cfg.target_device or cfg.device, dtype=cfg.dtype)
        draft = None
        if inputs.needs_draft_vlm:
            draft = load_model(cfg.draft, device=cfg.draft_device or cfg.device, dtype=cfg.dtype)
            draft.shared_vocab = shared_vocabulary(draft, target)  # ids the draft may propose
        adapter = head = None
        if inputs.paths["token_adapter"]:
            adapter = load_adapter(inputs.paths["token_adapter"]).to(draft.device).eval()
        if inputs.paths["draft_head"]:
            from specalign.align.heads import load_head

            head = load_head(inputs.paths["draft_head"], target).to(target.dtype)  # on the target's device
        rows, check = _decode_all(cfg, inputs, target, draft, adapter, head, progress)
        result = _summarise(cfg, inputs, rows, check, target, draft)
        _write(out, result)
    return result


def _decode_all(cfg: SpeculateConfig, inputs: Inputs, target, draft, adapter, head, progress: bool):
    """Every (sample, question): target alone and SD, `repeats` times each -> (rows, distribution check or None).
    adapter: the TokenAdapter or None; head: the --draft-head's module or None."""
    from specalign.align.features import placeholder_ids, visual_positions_end
    from specalign.decode.engine import language_model
    from specalign.decode.heads import CascadeDraft, HeadDraft, HybridDraft, TreeShape, head_feature_layers

    dataset, questions = inputs.dataset, inputs.questions
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed)
    gen = torch.Generator(device=target.device)
    # the draft samples on its own device (a generator serves one device)
    d_gen = gen if draft is None or draft.device == target.device else torch.Generator(device=draft.device)
    eos = target.eos_token_id
    n = len(dataset) if cfg.max_samples is None else min(cfg.max_samples, len(dataset))
    jobs = [(i, q) for i in range(n) for q in questions]
    t_engine = d_engine = h_engine = None
    kind = inputs.head_kind
    tree = TreeShape.parse(cfg.tree) if cfg.tree else None
    t_features = ()
    if kind in ("eagle", "eagle+events"):
        t_features = head_feature_layers(head, len(language_model(target)[0].layers))
    rows, check = [], None

    def source(de, extra: list[int] = ()):  # a fresh draft source per answer (extra: answer tokens in the prompt)
        if inputs.ngram is not None:  # text only: the target's prompt text (not its hundreds of visual placeholders)
            return NgramDraft(inputs.ngram, target.tokenizer.encode(t_prompt.text) + list(extra), target.vocab_size,
                              eos)  # fmt: skip
        if kind in ("eagle", "eagle+events"):
            ids = t_prompt.input_ids.tolist() + list(extra)
            head = HeadDraft(h_engine, t_engine, ids, first_text, context, tree, sampling, gen)
            return HybridDraft(VLMDraft(d_engine, de, sampling, d_gen), head) if inputs.hybrid else head
        if kind == "feature-adapter":
            return CascadeDraft(d_engine, de, head, sampling, d_gen)
        s = VLMDraft(d_engine, de, sampling, d_gen, cfg.min_confidence)
        return s if adapter is None else AdaptedDraft(s, adapter, sampling, d_gen, cfg.adapter_resync,
                                                      cfg.max_new_tokens)  # fmt: skip

    def reseed(*parts):  # each run of an answer draws the same random numbers: repeats give the same tokens
        gen.manual_seed(_seed(cfg.seed, *parts))
        if d_gen is not gen:
            d_gen.manual_seed(_seed(cfg.seed, *parts, 1))

    for k, (i, q) in enumerate(tqdm(jobs, desc="speculate", unit="answer", disable=not progress)):
        sample = dataset[i]
        seconds = {}
        t_prompt = target.prepare(sample, q)
        de = context = None
        with Clock(target.device, seconds, "vision"):  # vision encode + splice, both models (the draft's if used)
            te, _ = prompt_embeds(target, target.collate([t_prompt]))
            if draft is not None:
                d_prompt = draft.prepare(sample, q)
                de, _ = prompt_embeds(draft, draft.collate([d_prompt]))
                if kind == "eagle+events":  # its event tokens as spliced into its prompt: [1, N, E]
                    slots = torch.isin(d_prompt.input_ids, torch.tensor(placeholder_ids(draft)))
                    context = de[:, slots.to(de.device)]
        nodes = tree.nodes if tree else cfg.gamma
        need_t = te.shape[1] + cfg.max_new_tokens + nodes + 2
        if t_engine is None or t_engine.max_len < need_t:
            t_engine = Engine(target, need_t + 64, fp32_head=cfg.fp32_head, features=t_features,
                              **engine_options(cfg.engine, target.device))  # fmt: skip
        if de is not None and (d_engine is None or d_engine.max_len < de.shape[1] + cfg.max_new_tokens + 2 * cfg.gamma):
            d_layers = (len(language_model(draft)[0].layers),) if kind == "feature-adapter" else ()
            d_engine = Engine(draft, de.shape[1] + cfg.max_new_tokens + 2 * cfg.gamma + 64, features=d_layers)
        if t_features:
            first_text = int(visual_positions_end(target, t_prompt.input_ids))  # the head reads the text after it
            need_h = te.shape[1] - first_text + cfg.max_new_tokens + nodes * cfg.gamma
            if h_engine is None or h_engine.max_len < need_h:
                h_engine = Engine(head, need_h + 64, features=(1,))
        if not rows and target.device.type == "cuda":  # warm-up: CUDA graphs are captured on first use
            target_generate(t_engine, te, 4, eos)
            speculative_decode(t_engine, te, source(de), cfg.gamma, 4, eos)
        alone_runs, sd_runs = [], []
        for r in range(cfg.repeats):  # alternating order: neither side always runs on a warmer machine
            for side in ("alone", "sd") if r % 2 == 0 else ("sd", "alone"):
                reseed(k)
                _sync(target.device)
                t0 = time.perf_counter()
                if side == "alone":
                    ref, ref_seconds = target_generate(t_engine, te, cfg.max_new_tokens, eos, sampling, gen)
                    alone_runs.append((time.perf_counter() - t0, ref, ref_seconds))
                else:
                    out, stats = speculative_decode(t_engine, te, source(de), cfg.gamma, cfg.max_new_tokens, eos,
                                                    sampling, gen, cfg.hide_prefill, cfg.prefill_draft)  # fmt: skip
                    _sync(target.device)
                    sd_runs.append((time.perf_counter() - t0, out, stats))
        target_s, ref, ref_seconds = _median_run(alone_runs)
        sd_s, out, stats = _median_run(sd_runs)
        hf_s = None
        if cfg.hf_baseline:  # once: an order of magnitude slower, a reference point rather than a baseline
            t0 = time.perf_counter()
            target.generate([t_prompt], cfg.max_new_tokens, sampling)
            _sync(target.device)
            hf_s = time.perf_counter() - t0
        if check is None and not sampling.greedy and cfg.check_draws:
            check = distribution_check(t_engine, d_engine, te, de, ref, source, reseed, gen, cfg, sampling, eos)
        rows.append({
            "sample": i, "question": q, "sd_tokens": out, "target_tokens": ref, "same": out == ref,
            "divergence": divergence(t_engine, te, ref, out) if out != ref and sampling.greedy else None,
            "alpha": stats.alpha, "tau": stats.tau, "drafted": stats.drafted, "accepted": stats.accepted,
            "rounds": stats.rounds, "free_tokens": stats.free_tokens, "prefill_hit": stats.prefill_hit,
            "first_token_accepted": stats.first_accepted / max(stats.rounds, 1),
            "accepted_per_round": stats.accepted_per_round, "drafted_per_round": stats.drafted_per_round,
            "nodes_per_round": stats.nodes_per_round,
            "seconds": {"vision": seconds["vision"], **stats.seconds, "sd_total": sd_s, "target_alone": target_s,
                        "target_alone_prefill": ref_seconds["prefill"], "hf_generate": hf_s,
                        "sd_runs": [x[0] for x in sd_runs], "target_alone_runs": [x[0] for x in alone_runs]},
            "speedup": target_s / sd_s,
            "sd_text": target.decode(out), "target_text": target.decode(ref),
        })  # fmt: skip
    return rows, check


def _median_run(runs: list[tuple]) -> tuple:
    """The run with the median time (the lower one of an even count): (seconds, ...) tuples."""
    return sorted(runs, key=lambda x: x[0])[(len(runs) - 1) // 2]


# ---------------------------------------------------------------- the sampling check


def distribution_check(t_engine, d_engine, te, de, answer: list[int], make_source, reseed, gen,
                       cfg: SpeculateConfig, sampling: Sampling, eos: int) -> dict:  # fmt: skip
    """Sampling SD must draw each answer from the target's own distribution. On one prompt (te [1, T, D] for the
    target, de [1, T', D'] for the draft), extended by the first m tokens of the target's `answer` where the target
    is least certain (a stretch the target is sure of tests nothing), `check_draws` continuations of gamma + 1
    tokens from the target alone and as many from SD, each with its own seed. Tokens 2..gamma+1 of a continuation
    (the first is the target's own prefill sample on both sides) are compared position by position: total-variation
    distance and a two-sample chi-square test, Bonferroni over the positions."""
    length = min(cfg.gamma + 1, cfg.max_new_tokens)
    if length < 2:
        return {"run": False, "why": "--max-new-tokens 1: the only token is the target's own sample"}
    vocab = (d_engine or t_engine).vlm.vocab_size
    m, entropy = _uncertain_start(t_engine, te, answer, length, sampling, vocab)
    if m:
        ids = torch.tensor([answer[:m]])
        te = torch.cat([te, t_engine.lm.embed_tokens(ids.to(t_engine.device)).to(te.dtype)], dim=1)
        if de is not None:
            de = torch.cat([de, d_engine.lm.embed_tokens(ids.to(d_engine.device)).to(de.dtype)], dim=1)
    alone, sd = [], []
    for j in range(cfg.check_draws):
        reseed(-1, j)
        alone.append(target_generate(t_engine, te, length, eos, sampling, gen)[0])
        reseed(-2, j)
        sd.append(speculative_decode(t_engine, te, make_source(de, answer[:m]), cfg.gamma, length, eos, sampling, gen,
                                     cfg.hide_prefill, cfg.prefill_draft)[0])  # fmt: skip
    positions = []
    for p in range(1, length):
        a = [x[p] if p < len(x) else -1 for x in alone]  # -1: the answer ended (EOS) before p
        b = [x[p] if p < len(x) else -1 for x in sd]
        stat, dof, pvalue = chi_square(a, b)
        positions.append({"position": m + p + 1, "distinct_tokens": len(set(a) | set(b)),
                          "total_variation": round(total_variation(a, b), 4), "chi_square": round(stat, 3),
                          "dof": dof, "p": pvalue})  # fmt: skip
    p_all = min(1.0, len(positions) * min(x["p"] for x in positions))
    return {"run": True, "draws": cfg.check_draws, "prefix_tokens": m, "tokens": f"{m + 2}-{m + length}",
            "target_entropy_nats": round(entropy, 3), "positions": positions,
            "max_total_variation": max(x["total_variation"] for x in positions), "p": p_all,
            "consistent": p_all >= CHECK_ALPHA,
            "informative": any(x["distinct_tokens"] > 1 for x in positions)}  # fmt: skip


@torch.inference_mode()
def _uncertain_start(t_engine, te, answer: list[int], length: int, sampling: Sampling, draft_vocab: int):
    """m maximising the target's mean entropy (nats, under `sampling`) over answer positions m+1..m+length-1: the
    ones a continuation of `length` tokens from prompt + answer[:m] samples through the acceptance rule. Only
    prefixes of ids the draft has. -> (m, that mean entropy)."""
    from specalign.decode.engine import prefill, verify
    from specalign.models.base import probabilities

    bad = next((i for i, t in enumerate(answer) if t >= draft_vocab), len(answer))
    answer = answer[:bad]
    if len(answer) < length:
        return 0, 0.0
    logits = [prefill(t_engine, te)]  # [1, V]: the distribution of answer[0]
    logits.append(verify(t_engine, torch.tensor([answer[:-1]], device=t_engine.device))[0])  # answer[1:]
    p = probabilities(torch.cat(logits).float(), sampling)  # [len(answer), V]
    entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)
    window = entropy.unfold(0, length - 1, 1)[1:].mean(-1)  # window m: positions m+1..m+length-1
    m = int(window.argmax())
    return m, float(window[m])


def total_variation(a: list, b: list) -> float:
    """Half the L1 distance between the empirical distributions of two samples."""
    ca, cb = Counter(a), Counter(b)
    return 0.5 * sum(abs(ca[t] / len(a) - cb[t] / len(b)) for t in set(ca) | set(cb))


def chi_square(a: list, b: list) -> tuple[float, int, float]:
    """Two-sample chi-square test that a and b come from one distribution -> (statistic, degrees of freedom,
    p-value). Values seen fewer than 5 times in both samples together share one bin, so no expected count is tiny."""
    ca, cb = Counter(a), Counter(b)
    bins, rare = [], [0, 0]
    for t in set(ca) | set(cb):
        if ca[t] + cb[t] < 5:
            rare[0], rare[1] = rare[0] + ca[t], rare[1] + cb[t]
        else:
            bins.append((ca[t], cb[t]))
    if sum(rare):
        bins.append(tuple(rare))
    if len(bins) < 2:
        return 0.0, 0, 1.0
    na, nb = len(a), len(b)
    stat = 0.0
    for x, y in bins:
        ea, eb = na * (x + y) / (na + nb), nb * (x + y) / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    dof = len(bins) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return stat, dof, float(p)


# ---------------------------------------------------------------- the summary


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    v = sorted(values)
    x = q * (len(v) - 1)
    lo = math.floor(x)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (x - lo)


def verdict(cfg: SpeculateConfig, rows: list[dict], check: dict | None) -> dict:
    """What the run shows about losslessness, as data and as the one line the console and the report print."""
    if cfg.greedy:
        differ = sum(not r["same"] for r in rows)
        line = "token-identical to the target alone: " + (
            "yes" if not differ else f"no ({differ} of {len(rows)} answers differ)")  # fmt: skip
        return {"mode": "greedy", "token_identical": not differ, "answers_differing": differ, "line": line}
    line = "sampling: distribution-preserving rule (Leviathan et al.); token identity not expected"
    if check is None:
        line += "; no distribution test run (--check-draws 0)"
    elif not check["run"]:
        line += f"; no distribution test run ({check['why']})"
    else:
        line += (f"; distribution test on one prompt ({check['draws']} draws a side, tokens {check['tokens']}): "
                 f"max total variation {check['max_total_variation']:.3f}, chi-square p = {check['p']:.3g}: "
                 + ("consistent with the target alone" if check["consistent"]
                    else "SD does NOT follow the target's distribution"))  # fmt: skip
        if not check["informative"]:
            line += " (but the target chose one token at every compared position: nothing was tested)"
    return {"mode": "sampling", "token_identical": None, "distribution_check": check, "line": line}


def _summarise(cfg: SpeculateConfig, inputs: Inputs, rows: list[dict], check: dict | None, target, draft) -> dict:
    drafted = sum(r["drafted"] for r in rows)
    accepted = sum(r["accepted"] for r in rows)
    rounds = sum(r["rounds"] for r in rows)
    tokens = sum(len(r["sd_tokens"]) for r in rows)
    sd = sum(r["seconds"]["sd_total"] for r in rows)
    alone = sum(r["seconds"]["target_alone"] for r in rows)
    hf = [r["seconds"]["hf_generate"] for r in rows if r["seconds"]["hf_generate"] is not None]
    per = [r["speedup"] for r in rows]
    speedup = {"median": statistics.median(per), "p10": _quantile(per, 0.1), "p90": _quantile(per, 0.9),
               "min": min(per), "max": max(per), "overall": alone / sd, "repeats": cfg.repeats}  # fmt: skip
    totals = {
        "answers": len(rows), "tokens": tokens, "alpha": accepted / max(drafted, 1),
        "tau": (accepted + rounds) / max(rounds, 1),
        "first_token_acceptance": sum(r["first_token_accepted"] * r["rounds"] for r in rows) / max(rounds, 1),
        "mean_accepted_per_round": accepted / max(rounds, 1),
        "free_tokens_from_prefill_hiding": sum(r["free_tokens"] for r in rows),
        "sd_tokens_per_s": tokens / sd, "target_tokens_per_s": sum(len(r["target_tokens"]) for r in rows) / alone,
        "speedup_vs_target_alone": speedup, "speedup_vs_hf_generate": (sum(hf) / sd) if hf else None,
        "stage_seconds": {k: sum(r["seconds"].get(k, 0.0) for r in rows) for k in STAGES},
        "sd_seconds": sd, "target_alone_seconds": alone,
    }  # fmt: skip
    warnings = []
    speedup["too_short"] = len(rows) < SHORT_RUN_ANSWERS or sd < SHORT_RUN_SECONDS
    if speedup["too_short"]:
        warnings.append(f"too short to time well ({len(rows)} answers, SD {sd:.2f} s in all): the speedups are "
                        f"noise; time {SHORT_RUN_ANSWERS}+ answers and {SHORT_RUN_SECONDS:g}+ s of SD")  # fmt: skip
    v = verdict(cfg, rows, check)
    return {
        "config": asdict(cfg),
        "paths": inputs.paths,
        "target": target.name,
        "draft": draft.name if draft is not None else None,  # None: the source needs no draft VLM
        "device": str(target.device),
        "draft_device": str(draft.device) if draft is not None else None,
        "gpu": torch.cuda.get_device_name(target.device) if target.device.type == "cuda" else None,
        "verdict": v,
        # greedy: the tokens are the target's (the claim); sampling: not a token claim (see verdict)
        "lossless": v["token_identical"],
        "warnings": warnings,
        # greedy answers that differ: where, and the target's margin there (see decode.speculative.divergence)
        "divergences": [
            {"sample": r["sample"], "question": r["question"], **r["divergence"]} for r in rows if r.get("divergence")
        ],  # fmt: skip
        "totals": totals,
        "samples": rows,
    }


def speedup_line(sp: dict) -> str:
    """'median 1.32x (p10-p90 1.10-1.51x), overall 1.30x' from totals['speedup_vs_target_alone']."""
    return f"median {sp['median']:.2f}x (p10-p90 {sp['p10']:.2f}-{sp['p90']:.2f}x), overall {sp['overall']:.2f}x"


def report_lines(res: dict) -> list[str]:
    """What the console prints after a run: the verdict, acceptance, speedups with their spread, warnings."""
    t, c = res["totals"], res["config"]
    hf = t["speedup_vs_hf_generate"]
    lines = [
        res["verdict"]["line"],
        f"answers {t['answers']}  alpha {t['alpha']:.3f}  tau {t['tau']:.2f}",
        f"speedup vs target alone: {speedup_line(t['speedup_vs_target_alone'])} over answers, "
        f"{c['repeats']} timing{'s' if c['repeats'] > 1 else ''} each" + (f"; {hf:.2f}x vs HF generate" if hf else ""),
    ]
    lines += [f"warning: {w}" for w in res["warnings"]]
    lines.append(f"results: {res['paths']['out']}/results.json, BENCHMARK_RESULTS.md and 3 PNGs")
    return lines


def _write(out: Path, res: dict) -> None:
    write_json(out / "results.json", res)
    write_bytes(out / "BENCHMARK_RESULTS.md", _markdown(res).encode())
    _plots(out, res)


def _markdown(res: dict) -> str:
    t, c = res["totals"], res["config"]
    src = "draft VLM (resynced on the accepted prefix)"
    if c.get("ngram"):
        src = f"n-gram table `{res['paths']['ngram']}` (text only: prompt lookup or the table, whichever matched more)"
    if c.get("draft_head"):
        src = f"draft head `{res['paths']['draft_head']}` on the target's features" + (
            f", tree {c['tree']} (top-k, depth, nodes)" if c.get("tree") else ", a chain"
        )
        if c["hide_prefill"] and res["draft"]:
            src = f"hybrid: the draft VLM drafts the first round during the target's prefill, then the {src}"
    if c["token_adapter"]:
        src = f"TokenAdapter `{res['paths']['token_adapter']}` over " + (
            "the resynced draft's proposals" if c["adapter_resync"] else "the draft's own answer"
        )
    mode = "greedy" if c["temperature"] <= 0 else f"T={c['temperature']:g} top-p={c['top_p']:g}"
    sp, hf = t["speedup_vs_target_alone"], t["speedup_vs_hf_generate"]
    lines = [
        "# Speculative decoding results", "",
        f"target `{res['target']}`, draft `{res['draft']}`, source: {src}, gamma {c['gamma']}"
        + (f" (adaptive, min confidence {c['min_confidence']})" if c["min_confidence"] > 0 else "")
        + f", {mode}, "
        f"device {res['device']}{' (' + res['gpu'] + ')' if res['gpu'] else ''}", "",
        f"**{res['verdict']['line']}**", "",
        *[f"> warning: {w}" for w in res["warnings"]], *([""] if res["warnings"] else []),
        f"Speedups compare SD with the target alone on the same engine, each timed {c['repeats']} time(s) per answer "
        "in alternating order (the median kept); per-answer ratios are summarised by their median and p10-p90, "
        "`overall` is total target-alone time / total SD time."
        + (" HF generate is timed once per answer." if c["hf_baseline"] else ""), "",
        "| answers | tokens | alpha | tau | first-token acc. | accepted/round | SD tok/s | target tok/s | "
        "speedup median (p10-p90) | overall | vs HF generate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {t['answers']} | {t['tokens']} | {t['alpha']:.3f} | {t['tau']:.2f} | {t['first_token_acceptance']:.3f} | "
        f"{t['mean_accepted_per_round']:.2f} | {t['sd_tokens_per_s']:.1f} | {t['target_tokens_per_s']:.1f} | "
        f"{sp['median']:.2f}x ({sp['p10']:.2f}-{sp['p90']:.2f}) | {sp['overall']:.2f}x | "
        + (f"{hf:.2f}x |" if hf else "- |"), "",
        "Time by stage (s, all answers): " + ", ".join(f"{k} {v:.3f}" for k, v in t["stage_seconds"].items())
        + (f"; prefill hiding on: {t['free_tokens_from_prefill_hiding']} tokens accepted from drafts made during "
           "the target's prefill" if c["hide_prefill"] else ""), "",
    ]  # fmt: skip
    check = res["verdict"].get("distribution_check")
    if check and check["run"]:
        lines += ["## Distribution test (sampling)", "",
                  f"One prompt extended by the first {check['prefix_tokens']} tokens of the target's answer (where the "
                  f"target is least certain: mean entropy {check['target_entropy_nats']} nats), {check['draws']} "
                  f"continuations of {len(check['positions']) + 1} tokens from the target alone and as many from SD, "
                  "each with its own seed; at each position, the total-variation "
                  "distance between the two samples' token frequencies and a two-sample chi-square test (tokens "
                  f"seen fewer than 5 times share a bin). p over all positions (Bonferroni) = {check['p']:.3g}; the "
                  f"test fails below {CHECK_ALPHA}.", "",
                  "| answer token | distinct tokens | total variation | chi-square | dof | p |",
                  "|---|---|---|---|---|---|",
                  *[f"| {x['position']} | {x['distinct_tokens']} | {x['total_variation']:.3f} | "
                    f"{x['chi_square']:.2f} | {x['dof']} | {x['p']:.3g} |" for x in check["positions"]],
                  ""]  # fmt: skip
    if res.get("divergences"):
        lines += ["## Where greedy SD left the target-alone answer", "",
                  "margin = the target's logit of its own token minus that of the SD token at the first difference, "
                  "computed token by token (alone) and in one verify forward (verify); near 0 = a near-tie that "
                  "reduced precision can flip", "",
                  "| sample | question | position | target token | SD token | margin alone | margin verify |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {d['sample']} | {d['question']} | {d['position']} | {d['target_token']} | {d['sd_token']} | "
            f"{d.get('margin_alone', '-')} | {d.get('margin_verify', '-')} |"
            for d in res["divergences"]
        ]
        lines.append("")
    lines += ["## Inputs", "", *[f"- {k}: `{v}`" for k, v in res["paths"].items() if v], "", "## Examples", ""]
    differing = [r for r in res["samples"] if not r["same"]]
    for r in (differing + [r for r in res["samples"] if r["same"]])[:5]:
        lines += [f"**sample {r['sample']}: {r['question']}** (alpha {r['alpha']:.2f}, tau {r['tau']:.2f})", "",
                  f"- SD: {r['sd_text']}", f"- target alone: {r['target_text']}", ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plots(out: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def save(fig, name):
        fig.tight_layout()
        save_png(fig, out / name)

    stages = res["totals"]["stage_seconds"]
    colours = {"vision": "tab:blue", "prefill": "tab:orange", "draft": "tab:green", "adapt": "tab:red",
               "verify": "tab:purple", "decode": "tab:grey"}  # fmt: skip
    alone_prefill = sum(r["seconds"]["target_alone_prefill"] for r in res["samples"])
    alone = sum(r["seconds"]["target_alone"] for r in res["samples"])
    rows = {"vision encode\n(both models)": {"vision": stages["vision"]},
            "SD": {k: stages[k] for k in ("prefill", "draft", "adapt", "verify")},
            "target alone": {"prefill": alone_prefill, "decode": alone - alone_prefill}}  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 3.6))
    seen = set()
    for label, parts in rows.items():
        left = 0.0
        for k, v in parts.items():
            ax.barh([label], [v], left=left, color=colours[k], label=None if k in seen else k)
            seen.add(k)
            left += v
    ax.invert_yaxis()
    ax.set_xlabel("seconds over all answers (the speedup compares SD with target alone; vision is paid by both)")
    sp = res["totals"]["speedup_vs_target_alone"]
    ax.set_title(f"Where the time goes: SD {sp['overall']:.2f}x vs target alone overall, {sp['median']:.2f}x median")
    ax.legend(fontsize=8, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    save(fig, "timing_breakdown.png")

    per_round = [n for r in res["samples"] for n in r["accepted_per_round"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    g = res["config"]["gamma"]
    ax.hist(per_round, bins=[x - 0.5 for x in range(g + 2)], rwidth=0.85)
    ax.set_xlabel("draft tokens accepted in a round")
    ax.set_ylabel("rounds")
    shape = f"tree {res['config']['tree']}" if res["config"].get("tree") else f"gamma {g}"
    ax.set_title(f"Acceptance per round ({shape}, alpha {res['totals']['alpha']:.2f})")
    save(fig, "acceptance_histogram.png")

    per = [r["speedup"] for r in res["samples"]]
    lo, hi = min(per + [sp["overall"]]), max(per + [sp["overall"]])
    pad = max(hi - lo, 0.05 * hi, 1e-3) * 0.15
    lo, hi = lo - pad, hi + pad
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.axvspan(sp["p10"], sp["p90"], color="tab:blue", alpha=0.12, label=f"p10-p90 {sp['p10']:.2f}-{sp['p90']:.2f}x")
    ax.hist(per, bins=min(20, max(5, len(per))), range=(lo, hi), color="tab:blue", rwidth=0.9)
    ax.axvline(sp["median"], color="tab:red", lw=2, label=f"median {sp['median']:.2f}x")
    ax.axvline(sp["overall"], color="tab:orange", lw=2, ls="--", label=f"overall {sp['overall']:.2f}x")
    if lo - (hi - lo) < 1.0 < hi + (hi - lo):  # 1x in reach: drawn; far off: named in the title instead
        ax.axvline(1.0, color="k", lw=1, label="1x (no gain)")
        lo, hi = min(lo, 1.0 - pad), max(hi, 1.0 + pad)
    where = " (every answer slower than the target alone)" if hi < 1.0 else (
        " (every answer faster than the target alone)" if lo > 1.0 else "")  # fmt: skip
    ax.set_xlim(lo, hi)
    ax.set_xlabel(f"speedup vs target alone (same engine), per answer (median of {sp['repeats']} timings)")
    ax.set_ylabel("answers")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Speedup over {len(per)} answers{where}" + ("\ntoo short to time well" if sp["too_short"] else ""))
    ax.legend(fontsize=8, loc="best")
    save(fig, "speedup.png")
