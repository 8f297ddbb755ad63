"""specalign: cross-modal speculative decoding (event-camera draft VLM, RGB-video target VLM)."""

from __future__ import annotations

import argparse
import sys

from specalign.errors import SpecalignError


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def cmd_world_build(args) -> None:
    from specalign.world.build import WorldConfig, build_world

    w, h = args.size
    cfg = WorldConfig(
        out=args.out, duration=args.duration, train=args.train, test=args.test, seed=args.seed,
        width=w, height=h, clips_per_sequence=args.clips_per_sequence, mp4=not args.no_mp4, tokenizer=args.tokenizer,
        raw_dsec=args.raw_dsec, workers=args.workers, frame_scale=args.frame_scale,
    )  # fmt: skip
    summary = build_world(cfg, progress=not args.quiet)
    print_world_summary(summary)


def print_world_summary(summary: dict) -> None:
    print(f"minidsec world in {summary['out']}  (duration {summary['duration']}, seed {summary['seed']})")
    for split, s in summary["splits"].items():
        print(f"  {split:5s}  {s['clips']:6d} clips  {s['sequences']:5d} sequences  -> {s['dir']}/")
    print(f"  tokenizer: {summary['vocab_size']} tokens; questions: questions.json; built in {summary['seconds']} s")


def cmd_world_show(args) -> None:
    from specalign.world.show import contact_sheet

    path = contact_sheet(args.dataset, args.sample, args.out, question=args.question)
    print(f"wrote {path}")


def cmd_data_build_dsec(args) -> None:
    from specalign.data.dsec import build_dsec

    summary = build_dsec(
        args.raw_dir, args.out_dir, duration=args.duration, mp4=not args.no_mp4, workers=args.workers,
        sensor_size=args.sensor_size, progress=not args.quiet,
    )  # fmt: skip
    for k, v in summary.items():
        print(f"  {k}: {v}")


def cmd_train_mini(args) -> None:
    from dataclasses import replace

    from specalign.errors import SpecalignError
    from specalign.models.train_mini import SIZES, TrainConfig, train_mini

    sizes = SIZES.get(args.role)
    if args.add_vision_layers < 0 or args.add_lm_layers < 0:
        raise SpecalignError("--add-vision-layers/--add-lm-layers: layers can only be added (give a count >= 0)")
    if (args.add_vision_layers or args.add_lm_layers) and not args.init:
        raise SpecalignError("--add-vision-layers/--add-lm-layers deepen a model continued with --init")
    if args.image_size or args.patch_size:
        if args.init:
            raise SpecalignError("--image-size/--patch-size: a model continued with --init keeps its own sizes")
        sizes = replace(sizes, image_size=args.image_size or sizes.image_size,
                        patch_size=args.patch_size or sizes.patch_size)  # fmt: skip
        if sizes.image_size % sizes.patch_size:
            raise SpecalignError(
                f"--image-size {sizes.image_size} is not a multiple of --patch-size {sizes.patch_size}"
            )
    cfg = TrainConfig(
        role=args.role, world=args.world, out=args.out or f"assets/mini-{args.role}", duration=args.duration,
        steps=args.steps, clips_per_batch=args.clips_per_batch,
        questions_per_clip=args.questions_per_clip, lr=args.lr, seed=args.seed,
        eval_clips=args.eval_clips, max_train_clips=args.max_train_clips, sizes=sizes,
        time_budget=args.time_budget, init=args.init, fresh_scenes=args.fresh_scenes, fresh_buffer=args.fresh_buffer,
        fresh_workers=args.fresh_workers, add_vision_layers=args.add_vision_layers, add_lm_layers=args.add_lm_layers,
        **({"device": args.device} if args.device else {}),
    )  # fmt: skip
    manifest = train_mini(cfg, progress=not args.quiet)
    held = manifest["held_out"]
    print(f"mini-{args.role}: {manifest['parameters']:,} parameters, {manifest['train_seconds']} s training")
    print(f"  held-out: exact match {held['exact_match']:.3f}, fact accuracy {held['fact_accuracy']:.3f}")
    for k, v in held["per_fact"].items():
        print(f"    {k:28s} {v:.3f}  ({held['facts'][k]} facts)")


def cmd_answer(args) -> None:
    from specalign.data import open_dataset
    from specalign.models import Sampling, load_model

    vlm = load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    sample = open_dataset(args.dataset)[args.sample]
    question = args.question or sample.question
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(f"Q: {question}")
    print(f"A: {vlm.answer(sample, question, max_new_tokens=args.max_new_tokens, sampling=sampling)}")


def cmd_extract(args) -> None:
    from specalign.align.extract import ExtractConfig, extract

    cfg = ExtractConfig(
        dataset=args.dataset, out=args.out, draft=args.draft, target=args.target, questions=args.questions,
        questions_file=args.questions_file, max_samples=args.max_samples, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, mode=args.mode, dtype=args.dtype, hidden_states=args.hidden_states,
        engine=args.engine,
        **({"device": args.device} if args.device else {}),
    )  # fmt: skip
    m = extract(cfg, progress=not args.quiet)
    if "pairs" in m:
        print(f"{m['pairs']} pairs in {args.out}/pairs.jsonl  ({m['samples']} samples x {len(m['questions'])} "
              f"questions, {m['seconds_rank0']} s, peak memory {m['peak_memory_gb']} GB)")  # fmt: skip


def cmd_speculate(args) -> None:
    from specalign.decode.run import SpeculateConfig, run_speculate

    cfg = SpeculateConfig(
        dataset=args.dataset, out=args.out, draft=args.draft, target=args.target, questions=args.questions,
        questions_file=args.questions_file, max_samples=args.max_samples, gamma=args.gamma,
        min_confidence=args.min_confidence, max_new_tokens=args.max_new_tokens,
        use_token_adapter=args.use_token_adapter or args.token_adapter_path is not None,
        token_adapter_path=args.token_adapter_path, adapter_resync=args.adapter_resync,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        dtype=args.dtype, hf_baseline=not args.no_hf_baseline, hide_prefill=args.hide_prefill, fp32_head=args.fp32_head,
        draft_device=args.draft_device, target_device=args.target_device,
        **({"device": args.device} if args.device else {}),
    )  # fmt: skip
    t = run_speculate(cfg, progress=not args.quiet)
    r = t["totals"]
    print(
        f"lossless: {t['lossless']}  answers {r['answers']}  alpha {r['alpha']:.3f}  tau {r['tau']:.2f}  "
        f"speedup {r['speedup_vs_target_engine']:.2f}x vs target alone"
        + (f", {r['speedup_vs_hf_generate']:.2f}x vs HF generate" if r["speedup_vs_hf_generate"] else "")
    )
    print(f"results: {args.out}/results.json, BENCHMARK_RESULTS.md and 3 PNGs")


def cmd_train(args) -> None:
    from specalign.align.train import AdapterTrainConfig, train_adapter

    cfg = AdapterTrainConfig(
        train=args.train, test=args.test, task_name=args.task_name, out_root=args.out_root, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, early_stopping=args.early_stopping, vocab_size=args.vocab_size,
        embed_dim=args.embed_dim, num_layers=args.num_layers, num_heads=args.num_heads, token_bias=args.token_bias,
        seed=args.seed, resume=args.resume, checkpoint_every_s=args.checkpoint_every, compile=args.compile,
        **({"device": args.device} if args.device else {}),
    )  # fmt: skip
    r = train_adapter(cfg)
    best = r["best"]
    print(f"{r['status']}: best epoch {r['best_epoch']}  top-1 {best['top1']:.4f}  top-5 {best['top5']:.4f}  "
          f"baseline {best['baseline']:.4f}  ({r['seconds']:.1f} s)")  # fmt: skip
    print(f"task folder: {r.get('task_dir', args.out_root)}")


def cmd_tokens(args) -> None:
    from specalign.align.tokens import read_pairs, write_pairs, write_reference_json

    pairs = read_pairs(args.source)
    if args.tokens_command == "import":
        path = write_pairs(pairs, args.dest)
    else:
        path = write_reference_json(pairs, args.dest)
    print(f"{len(pairs)} pairs -> {path}")


def cmd_star(args) -> None:
    import os
    from pathlib import Path

    task = Path(args.task).resolve()
    if not (task / "results.json").is_file():
        raise SpecalignError(f"{task}: not a task folder (results.json is missing)")
    starred = task.parent / "starred"
    starred.mkdir(exist_ok=True)
    link = starred / task.name
    if not link.exists():
        os.symlink(os.path.relpath(task, starred), link)
    print(f"starred: {link}")


def cmd_evaluate(args) -> None:
    import json

    from specalign.evaluate.adapter import evaluate_adapter, latest_adapter
    from specalign.fsutil import write_json

    adapter = args.adapter or latest_adapter(args.task_root)
    r = evaluate_adapter(adapter, args.pairs)
    tf, ar = r["teacher_forced"], r["independent_generations_AR_comparison"]
    print(f"adapter {adapter} on {r['count']} pairs")
    print(
        f"  teacher-forced: top-1 {tf['top1']:.4f}  baseline {tf['baseline']:.4f}  improvement {tf['improvement']:+.4f}"
    )
    print(f"  AR comparison of independent generations (not acceptance): mean consecutive matches "
          f"{ar['mean_consecutive_matches']}, first token {ar['first_token_accuracy']:.4f}, "
          f"total {ar['total_match_rate']:.4f}")  # fmt: skip
    if args.out:
        write_json(args.out, r)
    else:
        print(json.dumps(tf["per_position"][:20]))


def cmd_debug_tokens(args) -> None:
    from specalign.evaluate.adapter import debug_tokens, latest_adapter

    adapter = args.adapter or latest_adapter(args.task_root)
    print(f"wrote {debug_tokens(adapter, args.pairs, args.out, args.tokenizer, args.samples)}")


def cmd_workflow(args) -> None:
    from specalign.align.workflow import WorkflowConfig, run_workflow

    s = run_workflow(WorkflowConfig(
        name=args.name, train=args.train, test=args.test, out=args.out, draft=args.draft, target=args.target,
        max_samples=args.max_samples, max_test_samples=args.max_test_samples, epochs=args.epochs,
        embed_dim=args.embed_dim, num_layers=args.num_layers, num_heads=args.num_heads, lr=args.lr,
        device=args.device), progress=not args.quiet)  # fmt: skip
    print()
    print("| workflow | train pairs | test pairs | baseline | adapter top-1 | improvement | seconds |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {s['workflow']} | {s['train_pairs']} | {s['test_pairs']} | {s['baseline']:.4f} | {s['top1']:.4f} | "
          f"{s['improvement']:+.4f} | {s['seconds']} |")  # fmt: skip
    print(f"task folder: {s['task']}")


def _split_and_models(p, out_help: str) -> None:
    """The arguments extract and speculate share: which split, which questions, which models."""
    p.add_argument("--dataset", required=True, help="a split folder")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--draft", default="mini-draft", help="a bundled model name or a checkpoint directory")
    p.add_argument("--target", default="mini-target", help="a bundled model name or a checkpoint directory")
    p.add_argument("--questions", type=int, default=1, help="the first N questions of the {question, count} list")
    p.add_argument("--questions-file", default=None, help="a {question, count} JSON list (the reference format)")
    p.add_argument("--max-samples", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specalign", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    world = sub.add_parser("world", help="the built-in miniature DSEC world (minidsec)")
    wsub = world.add_subparsers(dest="world_command", required=True, metavar="COMMAND")
    b = wsub.add_parser("build", help="simulate drives and write them in the reference derived layout")
    b.add_argument("--out", required=True, help="output directory (resumes if it holds a partial build)")
    b.add_argument("--duration", default="1s", help="clip duration: 500ms | 1s | 2s | 4s (default 1s)")
    b.add_argument("--train", type=int, default=5208, help="train clips (default 5208, the reference's 1 s size)")
    b.add_argument("--test", type=int, default=1100, help="test clips (default 1100)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    b.add_argument("--size", type=_size, default=(128, 96), help="frame and event-sensor size WxH (default 128x96)")
    b.add_argument("--frame-scale", type=int, default=1,
                   help="RGB frames at this multiple of the event sensor's size (DSEC's RGB camera has more pixels "
                   "than its event camera); the events do not change (default 1)")  # fmt: skip
    b.add_argument("--clips-per-sequence", type=int, default=8, help="50%%-overlap clips cut from one drive")
    b.add_argument("--raw-dsec", action="store_true", help="also write raw DSEC-layout sequences (events.h5, ...)")
    b.add_argument("--no-mp4", action="store_true", help="skip the mp4 copies of the clips")
    b.add_argument("--tokenizer", default=None,
                   help="reuse this tokenizer.json (e.g. a bundled model's) instead of training one")  # fmt: skip
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_world_build)

    s = wsub.add_parser("show", help="contact sheet of one sample: RGB frames, event images, scene, answers")
    s.add_argument("--dataset", required=True, help="a split folder, e.g. WORLD/my_egpt_dsec_seq_1s")
    s.add_argument("--sample", type=int, default=0, help="sample index in the split")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--question", default=None, help="question to show answers for (default: the sample's own)")
    s.set_defaults(func=cmd_world_show)

    data = sub.add_parser("data", help="dataset layouts")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    d = dsub.add_parser("build-dsec", help="build the derived layout from a raw DSEC tree")
    d.add_argument("raw_dir", help="a DSEC sequence folder, or a folder of them (e.g. DSEC/train)")
    d.add_argument("out_dir", help="derived split folder to write, e.g. my_egpt_dsec_train_1s")
    d.add_argument("--duration", default="1s", help="500ms | 1s | 2s | 4s (default 1s)")
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--sensor-size", type=_size, default=None, help="event sensor WxH (default: from h5, else 640x480)")
    d.add_argument("--no-mp4", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_data_build_dsec)

    models = sub.add_parser("models", help="draft and target models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    t = msub.add_parser("train-mini", help="train the mini target (Video-LLaVA) or draft (EventGPT) on a world")
    t.add_argument("--role", required=True, choices=["target", "draft"])
    t.add_argument("--world", required=True, help="a minidsec world folder (from `world build`)")
    t.add_argument("--out", default=None, help="checkpoint folder (default assets/mini-ROLE); resumes if present")
    t.add_argument("--duration", default="1s")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--clips-per-batch", type=int, default=32, help="clips per step (x4 questions each)")
    t.add_argument("--questions-per-clip", type=int, default=4, help="questions per clip and step (default 4)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-clips", type=int, default=200, help="held-out clips scored (x50 questions)")
    t.add_argument("--max-train-clips", type=int, default=None)
    t.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds (saves)")
    t.add_argument("--init", default=None,
                   help="continue from this checkpoint (e.g. mini-target) instead of from scratch")  # fmt: skip
    t.add_argument(
        "--add-vision-layers",
        type=int,
        default=0,
        help="with --init, target only: insert this many vision layers that start as the identity",
    )
    t.add_argument(
        "--add-lm-layers",
        type=int,
        default=0,
        help="with --init, target only: append this many LM layers that start as the identity",
    )
    t.add_argument(
        "--fresh-scenes",
        action="store_true",
        help="target only: keep replacing training clips with never-seen drives rendered on the fly",
    )
    t.add_argument("--fresh-buffer", type=int, default=8192, help="clips held at once with --fresh-scenes")
    t.add_argument("--fresh-workers", type=int, default=None,
                   help="processes rendering fresh scenes (default: all cores but two)")  # fmt: skip
    t.add_argument("--image-size", type=int, default=None,
                   help="from scratch: the vision tower's input side (default 112; e.g. 224 with --patch-size "
                   "28 on a world built with --frame-scale 2: finer pixels, as many visual tokens)")  # fmt: skip
    t.add_argument("--patch-size", type=int, default=None, help="from scratch: the vision tower's patch (default 14)")
    t.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train_mini)

    e = sub.add_parser("extract", help="paired draft/target generations for every (sample, question)")
    _split_and_models(e, "output folder (resumes if it holds a partial run)")
    e.add_argument("--max-new-tokens", type=int, default=50)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--mode", default="sequential", choices=["sequential", "parallel"])
    e.add_argument("--engine", default="static", choices=["static", "hf"],
                   help="static: our static-cache engine, the visual prefix prefilled once per sample (default); "
                   "hf: transformers generate (used anyway with --hidden-states)")  # fmt: skip
    e.add_argument(
        "--hidden-states",
        action="store_true",
        help="also store each token's last-layer hidden state of both models (hidden/*.safetensors)",
    )
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", default=None)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_extract)

    tr = sub.add_parser("train", help="train a TokenAdapter on token pairs (the reference recipe by default)")
    tr.add_argument("--train", required=True, help="token pairs: our store folder or a reference JSON")
    tr.add_argument("--test", required=True)
    tr.add_argument("--task-name", default="adapter")
    tr.add_argument("--out-root", default="task", help="task folders go here (default task/)")
    tr.add_argument("--epochs", type=int, default=50)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--early-stopping", type=int, default=10, help="patience in epochs; 999 disables")
    tr.add_argument("--vocab-size", type=int, default=None, help="default: largest token id + 1")
    tr.add_argument("--embed-dim", type=int, default=512)
    tr.add_argument("--num-layers", type=int, default=4)
    tr.add_argument("--num-heads", type=int, default=8)
    tr.add_argument("--token-bias", action="store_true", help="the reference's token_bias variant")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", default=None, help="a task folder to continue")
    tr.add_argument("--device", default=None)
    tr.add_argument(
        "--checkpoint-every",
        type=float,
        default=30.0,
        help="seconds between last_state.pt saves (resume points; default 30, 0 = every epoch)",
    )
    tr.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU; ~1 min to compile)")
    tr.set_defaults(func=cmd_train)

    sp = sub.add_parser("speculate", help="speculative decoding over a split: lossless check, alpha, tau, speedup")
    _split_and_models(sp, "results folder")
    sp.add_argument("--gamma", type=int, default=4, help="draft tokens per round (default 4)")
    sp.add_argument(
        "--min-confidence",
        type=float,
        default=0.0,
        help="adaptive gamma: stop drafting when the draft's probability falls below this",
    )
    sp.add_argument("--max-new-tokens", type=int, default=50)
    sp.add_argument("--use-token-adapter", action="store_true", help="map the draft's proposals through an adapter")
    sp.add_argument("--token-adapter-path", default=None, help="a best_model/ folder (default: the latest task)")
    sp.add_argument(
        "--adapter-resync",
        action="store_true",
        help="map the resynced draft's per-round proposals (default: its own whole answer, as trained)",
    )
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--hide-prefill", action="store_true", help="the draft drafts while the target prefills")
    sp.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    sp.add_argument("--draft-device", default=None, help="e.g. cuda:1 (default: --device)")
    sp.add_argument("--target-device", default=None, help="e.g. cuda:0 (default: --device)")
    sp.add_argument("--dtype", default=None)
    sp.add_argument("--no-hf-baseline", action="store_true", help="skip timing HF generate")
    sp.add_argument("--fp32-head", action=argparse.BooleanOptionalAction, default=True,
                    help="the target's logits from an fp32 LM head (default on): bf16 logits tie now and then, and "
                    "a tie may break differently in a verify than in a decode step on a GPU")  # fmt: skip
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_speculate)

    tok = sub.add_parser("tokens", help="convert token pairs between our store and the reference JSON")
    toksub = tok.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")
    for verb, helptext in (("import", "reference JSON (or folder of them) -> our store folder"),
                           ("export", "our store folder -> one reference JSON file")):  # fmt: skip
        tp = toksub.add_parser(verb, help=helptext)
        tp.add_argument("source")
        tp.add_argument("dest")
        tp.set_defaults(func=cmd_tokens)

    ev = sub.add_parser("evaluate", help="teacher-forced adapter metrics + the reference's AR comparison")
    ev.add_argument("--pairs", required=True, help="token pairs (our store or reference JSON)")
    ev.add_argument("--adapter", default=None, help="adapter folder/checkpoint (default: the latest task's)")
    ev.add_argument("--task-root", default="task")
    ev.add_argument("--out", default=None, help="write the full metrics JSON here")
    ev.set_defaults(func=cmd_evaluate)

    dt = sub.add_parser("debug-tokens", help="write TOKEN_ALIGNMENT_ANALYSIS.md (token-by-token comparison)")
    dt.add_argument("--pairs", required=True)
    dt.add_argument("--adapter", default=None)
    dt.add_argument("--task-root", default="task")
    dt.add_argument("--tokenizer", default=None, help="tokenizer.json to decode ids (e.g. assets/mini-target/)")
    dt.add_argument("--samples", type=int, default=5)
    dt.add_argument("--out", default="TOKEN_ALIGNMENT_ANALYSIS.md")
    dt.set_defaults(func=cmd_debug_tokens)

    wf = sub.add_parser("workflow", help="extract (train+test) -> train -> evaluate, resumable")
    wf.add_argument("name", choices=["1q", "10q", "50q"])
    wf.add_argument("--train", required=True, help="train split folder")
    wf.add_argument("--test", required=True, help="test split folder")
    wf.add_argument("--out", default="runs", help="runs/<name>/ holds every stage and workflow.log")
    wf.add_argument("--draft", default="mini-draft")
    wf.add_argument("--target", default="mini-target")
    wf.add_argument("--max-samples", type=int, default=None)
    wf.add_argument("--max-test-samples", type=int, default=None)
    wf.add_argument("--epochs", type=int, default=50)
    wf.add_argument("--embed-dim", type=int, default=512)
    wf.add_argument("--num-layers", type=int, default=4)
    wf.add_argument("--num-heads", type=int, default=8)
    wf.add_argument("--lr", type=float, default=1e-4)
    wf.add_argument("--device", default=None)
    wf.add_argument("--quiet", action="store_true")
    wf.set_defaults(func=cmd_workflow)

    st = sub.add_parser("star", help="link a task folder under task/starred/")
    st.add_argument("task")
    st.set_defaults(func=cmd_star)

    a = sub.add_parser("answer", help="print one model's answer for one sample")
    a.add_argument("--model", default="mini-target", help="bundled name (mini-target, mini-draft) or checkpoint")
    a.add_argument("--backend", default=None, help="video-llava | eventgpt | llava (default: from config.json)")
    a.add_argument("--dataset", required=True, help="a split folder")
    a.add_argument("--sample", type=int, default=0)
    a.add_argument("--question", default=None, help="default: the sample's own question")
    a.add_argument("--max-new-tokens", type=int, default=72)
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a.add_argument("--top-p", type=float, default=1.0)
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--device", default="cpu")
    a.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    a.set_defaults(func=cmd_answer)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
