"""specalign: cross-modal speculative decoding (event-camera draft VLM, RGB-video target VLM).

Every command's options come from its config dataclass (`specalign.options`): the option, its default and its
help are written once, beside the code that uses them. This file wires commands to run functions and prints
their results.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from specalign.errors import SpecalignError
from specalign.options import HelpFormatter, add_options, from_args, parse_size


def quiet_third_party() -> None:
    """--quiet: no progress bars or info logs from transformers / huggingface_hub either."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# ---- commands -------------------------------------------------------------------------------------------------


def cmd_world_build(args) -> None:
    from specalign.world.build import WorldConfig, build_world

    w, h = args.sensor_size
    summary = build_world(from_args(WorldConfig, args, width=w, height=h), progress=not args.quiet)
    print(f"minidsec world in {summary['out']}  (duration {summary['duration']}, seed {summary['seed']})")
    for split, s in summary["splits"].items():
        print(f"  {split:5s}  {s['clips']:6d} clips  {s['sequences']:5d} sequences  -> {s['dir']}/")
    print(f"  tokenizer: {summary['vocab_size']} tokens; questions: questions.json; built in {summary['seconds']} s")


def cmd_world_show(args) -> None:
    from specalign.world.show import contact_sheet

    print(f"wrote {contact_sheet(args.dataset, args.sample, args.out, question=args.question)}")


def cmd_data_build_dsec(args) -> None:
    from specalign.data.dsec import DsecBuildConfig, build_dsec

    summary = build_dsec(from_args(DsecBuildConfig, args), progress=not args.quiet)
    for k, v in summary.items():
        print(f"  {k}: {v}")


def cmd_train_mini(args) -> None:
    from specalign.models.train_mini import TrainConfig, train_mini

    manifest = train_mini(from_args(TrainConfig, args), progress=not args.quiet)
    held = manifest["held_out"]
    print(f"mini-{args.role}: {manifest['parameters']:,} parameters, {manifest['train_seconds']} s training")
    print(f"  held-out: exact match {held['exact_match']:.3f}, fact accuracy {held['fact_accuracy']:.3f}")
    for k, v in held["per_fact"].items():
        print(f"    {k:28s} {v:.3f}  ({held['facts'][k]} facts)")


def cmd_answer(args) -> None:
    from specalign.data import open_dataset
    from specalign.models import Sampling, load_model

    if args.temperature < 0:
        raise SpecalignError(f"--temperature: must be 0 (greedy) or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise SpecalignError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise SpecalignError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    dataset = open_dataset(args.dataset)
    if not 0 <= args.sample < len(dataset):
        raise SpecalignError(f"--sample: {args.dataset} has samples 0..{len(dataset) - 1}, got {args.sample}")
    vlm = load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    sample = dataset[args.sample]
    question = args.question or sample.question
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(f"Q: {question}")
    print(f"A: {vlm.answer(sample, question, max_new_tokens=args.max_new_tokens, sampling=sampling)}")


def cmd_extract(args) -> None:
    from specalign.align.extract import ExtractConfig, extract, summary_line

    m = extract(from_args(ExtractConfig, args), progress=not args.quiet)
    if "pairs" in m:  # under torchrun only rank 0 merges and reports
        print(summary_line(m, args.out))


def cmd_train(args) -> None:
    from specalign.align.train import AdapterTrainConfig, result_lines, train_adapter

    print("\n".join(result_lines(train_adapter(from_args(AdapterTrainConfig, args), progress=not args.quiet))))


def cmd_train_head(args) -> None:
    from specalign.align.train_head import HeadTrainConfig, result_lines, train_head

    print("\n".join(result_lines(train_head(from_args(HeadTrainConfig, args), progress=not args.quiet))))


def cmd_export_head(args) -> None:
    from specalign.align.export_head import ExportConfig, export_head

    r = export_head(from_args(ExportConfig, args))
    print(f"EAGLE-1 checkpoint for {r['engine']} in {r['out']}: {r['tensors']} tensors, {r['parameters']:,} "
          f"parameters, {r['dtype']}")  # fmt: skip


def cmd_distill(args) -> None:
    from specalign.align.distill import DistillConfig, distill, result_lines

    print("\n".join(result_lines(distill(from_args(DistillConfig, args), progress=not args.quiet))))


def cmd_speculate(args) -> None:
    from specalign.decode.run import SpeculateConfig, report_lines, run_speculate

    print("\n".join(report_lines(run_speculate(from_args(SpeculateConfig, args), progress=not args.quiet))))


def cmd_ngram_build(args) -> None:
    from specalign.decode.ngram import NgramBuildConfig, build_ngram

    s = build_ngram(from_args(NgramBuildConfig, args))
    print(f"n-gram table: {s['contexts']} contexts (n = {s['n']}) from {s['sequences']} answers ({s['tokens']} tokens) "
          f"-> {s['path']}")  # fmt: skip


def cmd_tokens(args) -> None:
    from specalign.align.tokens import read_pairs, write_pairs, write_reference_json

    pairs = read_pairs(args.source)
    path = write_pairs(pairs, args.dest) if args.tokens_command == "import" else write_reference_json(pairs, args.dest)
    print(f"{len(pairs)} pairs -> {path}")


def cmd_star(args) -> None:
    from specalign.align.train import star_task

    print(f"starred: {star_task(args.task)}")


def cmd_evaluate(args) -> None:
    from specalign.evaluate.adapter import EvaluateConfig, evaluate_lines, run_evaluate

    print("\n".join(evaluate_lines(run_evaluate(from_args(EvaluateConfig, args)))))


def cmd_debug_tokens(args) -> None:
    from specalign.evaluate.adapter import DebugTokensConfig, run_debug_tokens

    print(f"wrote {run_debug_tokens(from_args(DebugTokensConfig, args))}")


def cmd_workflow(args) -> None:
    from specalign.align.workflow import WorkflowConfig, run_workflow, summary_lines

    print("\n".join(summary_lines(run_workflow(from_args(WorkflowConfig, args), progress=not args.quiet))))


# ---- the parser -----------------------------------------------------------------------------------------------


def _command(sub, name: str, help: str, func, config: str | None = None, quiet: bool = True,
             skip: tuple[str, ...] = ()):  # fmt: skip
    """A leaf command. `config` is "module:Class", imported only when this command is the one being run (or when
    the whole parser is built), so `specalign world build` does not pay for importing torch."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    if config is not None and _wanted(sub, name):
        module, cls = config.split(":")
        add_options(p, getattr(importlib.import_module(module), cls), skip=skip)
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    p.set_defaults(func=func)
    return p


def _wanted(sub, name: str) -> bool:
    selected = getattr(sub, "_specalign_selected", None)
    return selected is None or name in selected


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with argv, only the options of the command argv names are built (the rest keep their
    names and help)."""
    from specalign import __version__

    selected = None if argv is None else {a for a in argv[:2] if not a.startswith("-")}
    p = argparse.ArgumentParser(prog="specalign", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"specalign {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub._specalign_selected = selected

    world = sub.add_parser("world", help="the built-in miniature DSEC world (minidsec)")
    wsub = world.add_subparsers(dest="world_command", required=True, metavar="COMMAND")
    wsub._specalign_selected = selected
    b = _command(wsub, "build", "simulate drives and write them in the reference derived layout (resumable)",
                 cmd_world_build, "specalign.world.build:WorldConfig")  # fmt: skip
    b.add_argument("--sensor-size", type=parse_size, default="128x96", metavar="WxH",
                   help="event sensor size; the RGB frames too, times --frame-scale")  # fmt: skip
    s = _command(wsub, "show", "contact sheet of one sample: RGB frames, event images, scene, answers",
                 cmd_world_show, quiet=False)  # fmt: skip
    s.add_argument("--dataset", required=True, help="a split folder, e.g. WORLD/my_egpt_dsec_seq_1s")
    s.add_argument("--sample", type=int, default=0, help="sample index in the split")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--question", default=None, help="question to show answers for (default: the sample's own)")

    data = sub.add_parser("data", help="dataset layouts")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    dsub._specalign_selected = selected
    _command(dsub, "build-dsec", "build the reference derived layout from a raw DSEC tree (resumable)",
             cmd_data_build_dsec, "specalign.data.dsec:DsecBuildConfig")  # fmt: skip

    models = sub.add_parser("models", help="draft and target models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    msub._specalign_selected = selected
    _command(msub, "train-mini", "train the mini target (Video-LLaVA) or draft (EventGPT) on a world (resumable)",
             cmd_train_mini, "specalign.models.train_mini:TrainConfig")  # fmt: skip

    _command(sub, "extract", "paired draft/target generations for every (sample, question) (resumable)",
             cmd_extract, "specalign.align.extract:ExtractConfig")  # fmt: skip
    _command(sub, "train", "train a TokenAdapter on token pairs (the reference recipe by default; resumable)",
             cmd_train, "specalign.align.train:AdapterTrainConfig")  # fmt: skip
    _command(sub, "train-head", "train a draft head on the target's features (eagle, eagle+events, feature-adapter)",
             cmd_train_head, "specalign.align.train_head:HeadTrainConfig")  # fmt: skip
    _command(sub, "export-head", "write an eagle-1 head in the public EAGLE-1 layout that vLLM and SGLang load",
             cmd_export_head, "specalign.align.export_head:ExportConfig")  # fmt: skip
    _command(sub, "distill", "LoRA-distil a draft VLM on the target's answers of an extraction (resumable)",
             cmd_distill, "specalign.align.distill:DistillConfig")  # fmt: skip
    _command(sub, "speculate", "speculative decoding over a split: lossless check, alpha, tau, speedup",
             cmd_speculate, "specalign.decode.run:SpeculateConfig")  # fmt: skip
    _command(sub, "evaluate", "teacher-forced TokenAdapter metrics + the reference's AR comparison",
             cmd_evaluate, "specalign.evaluate.adapter:EvaluateConfig", quiet=False)  # fmt: skip
    _command(sub, "debug-tokens", "write a token-by-token comparison (TOKEN_ALIGNMENT_ANALYSIS.md)",
             cmd_debug_tokens, "specalign.evaluate.adapter:DebugTokensConfig", quiet=False)  # fmt: skip
    wf = _command(sub, "workflow", "extract (train + test) -> train -> evaluate, resumable", cmd_workflow,
                  "specalign.align.workflow:WorkflowConfig", skip=("name",))  # fmt: skip
    wf.add_argument("name", help="how many questions per sample: 1q, 10q or 50q")

    ngram = sub.add_parser("ngram", help="a text-only draft: an n-gram table of the target's own answers")
    nsub = ngram.add_subparsers(dest="ngram_command", required=True, metavar="COMMAND")
    nsub._specalign_selected = selected
    _command(nsub, "build", "build the table from an extraction's target answers (for speculate --ngram)",
             cmd_ngram_build, "specalign.decode.ngram:NgramBuildConfig", quiet=False)  # fmt: skip

    tok = sub.add_parser("tokens", help="convert token pairs between our store and the reference JSON")
    toksub = tok.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")
    for verb, helptext in (("import", "reference JSON (or folder of them) -> our store folder"),
                           ("export", "our store folder -> one reference JSON file")):  # fmt: skip
        tp = _command(toksub, verb, helptext, cmd_tokens, quiet=False)
        tp.add_argument("source")
        tp.add_argument("dest")

    st = _command(sub, "star", "link a task folder under <its folder>/starred/", cmd_star, quiet=False)
    st.add_argument("task", help="a task folder (holds results.json)")

    a = _command(sub, "answer", "print one model's answer for one sample", cmd_answer)
    a.add_argument("--model", default="mini-target",
                   help="a bundled name (mini-target, mini-draft), a checkpoint folder or a cached hub id")  # fmt: skip
    a.add_argument("--backend", default=None, choices=["video-llava", "eventgpt", "llava"],
                   help="the model's family (default: from its config.json)")  # fmt: skip
    a.add_argument("--dataset", required=True, help="a split folder")
    a.add_argument("--sample", type=int, default=0, help="sample index in the split")
    a.add_argument("--question", default=None, help="default: the sample's own question")
    a.add_argument("--max-new-tokens", type=int, default=72, help="answer length limit")
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    a.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    a.add_argument("--seed", type=int, default=None, help="sampling seed")
    a.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    a.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_third_party()
    try:
        args.func(args)
    except SpecalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
