"""Mini-model training (a few CPU steps on a tiny world), the bundled models, and the loader's errors."""

import json
from dataclasses import replace

import pytest
import torch
from processes import interrupt_at_call

from specalign.cli import main
from specalign.data import open_dataset
from specalign.errors import SpecalignError
from specalign.models import load_model
from specalign.models.registry import BUNDLED, SIZES, MiniSizes
from specalign.models.train_mini import TrainConfig, train_mini
from specalign.world.build import WorldConfig, build_world

TINY = MiniSizes(image_size=28, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2, lm_hidden=32,
                 lm_layers=1, lm_heads=2, lm_intermediate=64)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), duration="500ms", train=4, test=2, width=32, height=24,
                            clips_per_sequence=2, mp4=False), progress=False)  # fmt: skip
    return out


@pytest.mark.parametrize("role", ["target", "draft"])
def test_train_mini_runs_saves_and_loads(world, tmp_path, role):
    out = tmp_path / role
    cfg = TrainConfig(role=role, world=str(world), out=str(out), duration="500ms", steps=6, clips_per_batch=2,
                      questions_per_clip=2, lr=3e-3, warmup=1, eval_clips=1, checkpoint_every=3, device="cpu",
                      sizes=TINY)  # fmt: skip
    manifest = train_mini(cfg, progress=False)
    assert manifest["role"] == role and manifest["parameters"] > 0
    assert manifest["held_out"]["answers"] == 50
    assert json.loads((out / "manifest.json").read_text())["train_config"]["steps"] == 6
    vlm = load_model(str(out))  # the same code path as a user's checkpoint
    assert vlm.kind == ("video-llava" if role == "target" else "eventgpt")
    assert not vlm.image_processor.do_center_crop  # whole frames squashed into the square, saved with the weights
    sample = open_dataset(world / "my_egpt_dsec_seq_500ms")[0]
    assert isinstance(vlm.answer(sample, "Describe the scene.", max_new_tokens=5), str)


def test_killed_training_resumes_only_with_its_own_settings(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "resume"
    cfg = dict(role="draft", world=str(world), out=str(out), duration="500ms", steps=6, clips_per_batch=2,
               questions_per_clip=2, warmup=1, eval_clips=1, checkpoint_every=2, device="cpu", sizes=TINY)  # fmt: skip
    real_step = interrupt_at_call(monkeypatch, torch.optim.AdamW, "step", 5)  # killed during the 5th step
    with pytest.raises(KeyboardInterrupt):
        train_mini(TrainConfig(**cfg), progress=False)
    state = out / "train_state.pt"
    assert torch.load(state, weights_only=True)["step"] == 4, "finished steps are kept"
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    kept = state.read_bytes()
    # other settings, or another world, cannot continue this run; the training state is left as it was
    with pytest.raises(SpecalignError, match=r"holds a run with other settings \(train_config.lr: 0.001 then, 0.002"):
        train_mini(TrainConfig(**{**cfg, "lr": 2e-3}), progress=False)
    assert state.read_bytes() == kept
    # a truncated training state (a disk filled up) is named, not loaded, and not removed
    state.write_bytes(kept[: len(kept) // 2])
    with pytest.raises(SpecalignError, match="train_state.pt: unreadable training state") as e:
        train_mini(TrainConfig(**cfg), progress=False)
    assert "\n" not in str(e.value) and state.stat().st_size == len(kept) // 2
    state.write_bytes(kept)
    manifest = train_mini(TrainConfig(**cfg), progress=False)
    assert "resuming at step 4" in capsys.readouterr().out
    assert manifest["train_config"]["steps"] == 6 and not state.exists()
    # the same run asked for again is finished: its manifest, not a second training
    again = train_mini(TrainConfig(**cfg), progress=False)
    assert "already holds this run, finished" in capsys.readouterr().out and again == manifest
    again = train_mini(TrainConfig(**{**cfg, "seed": 1, "overwrite": True}), progress=False)
    assert again["train_config"]["seed"] == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(steps=0), "--steps: must be at least 1, got 0"),
        (dict(clips_per_batch=-4), "--clips-per-batch: must be at least 1, got -4"),
        (dict(questions_per_clip=51), "--questions-per-clip: a clip has 50 questions, got 51"),
        (dict(lr=-1.0), "--lr: must be positive, got -1.0"),
        (dict(time_budget=0), "--time-budget: must be positive, got 0"),
        (dict(seed=-1), "--seed: must be at least 0, got -1"),
        (dict(eval_clips=0), "--eval-clips: must be at least 1, got 0"),
        (dict(init="mini-target", add_lm_layers=-1), "--add-lm-layers: must be at least 0, got -1"),
        (dict(add_lm_layers=1), "--add-vision-layers/--add-lm-layers deepen a model continued with --init"),
        (dict(role="draft", init="mini-draft", add_vision_layers=1), "only the target can be deepened"),
        (dict(role="draft", fresh_scenes=True), "--fresh-scenes: only the target's clips can be rendered"),
        (dict(image_size=100), "--image-size 100 is not a multiple of --patch-size 14"),
        (dict(image_size=224, init="mini-target"), "a model continued with --init keeps its own sizes"),
        (dict(role="teacher"), "--role: unknown role 'teacher'"),
        (dict(device="gpu"), "--device: unknown device 'gpu'"),
    ],
)
def test_train_config_refuses_bad_values_on_one_line(change, message):
    with pytest.raises(SpecalignError) as e:
        TrainConfig(**{"role": "target", "world": "w", "out": "o", **change})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_train_mini_refuses_a_bad_world_before_training(world, tmp_path):
    base = dict(role="draft", duration="500ms", steps=2, device="cpu", sizes=TINY)
    with pytest.raises(SpecalignError, match="nope: no such world folder"):
        train_mini(TrainConfig(world=str(tmp_path / "nope"), out=str(tmp_path / "o"), **base), progress=False)
    (tmp_path / "bare").mkdir()
    with pytest.raises(SpecalignError, match="not a minidsec world .tokenizer.json is missing"):
        train_mini(TrainConfig(world=str(tmp_path / "bare"), out=str(tmp_path / "o"), **base), progress=False)
    empty = tmp_path / "empty"
    build_world(WorldConfig(out=str(empty), duration="500ms", train=0, test=1, width=32, height=24,
                            clips_per_sequence=1, mp4=False), progress=False)  # fmt: skip
    with pytest.raises(SpecalignError, match="the train split is empty: nothing to train on"):
        train_mini(TrainConfig(world=str(empty), out=str(tmp_path / "o"), **base), progress=False)
    assert not (tmp_path / "o").exists(), "nothing written before the inputs are checked"


def test_bundled_models_load_by_name_and_answer():
    if not all((p / "config.json").is_file() for p in BUNDLED.values()):
        pytest.skip("bundled models not present")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        build_world(WorldConfig(out=d, train=0, test=1, clips_per_sequence=1, mp4=False), progress=False)
        sample = open_dataset(Path(d) / "my_egpt_dsec_seq_1s")[0]
        for name, kind in (("mini-target", "video-llava"), ("mini-draft", "eventgpt")):
            vlm = load_model(name)
            assert vlm.kind == kind
            manifest = json.loads((BUNDLED[name] / "manifest.json").read_text())
            assert manifest["parameters"] == sum(p.numel() for p in vlm.model.parameters())
            answer = vlm.answer(sample, "What are the key elements in this scene?")
            assert len(answer.split()) >= 8
    assert SIZES["draft"].lm_hidden < SIZES["target"].lm_hidden, "the draft is the cheaper model"


def test_loader_errors_are_one_line(world, tmp_path, capsys):
    with pytest.raises(SpecalignError, match="no such model"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SpecalignError, match="unknown model_type 'bert'"):
        load_model(str(tmp_path / "ck"))
    assert main(["answer", "--model", str(tmp_path / "ck"), "--dataset", str(world / "my_egpt_dsec_seq_500ms")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json" in err


def test_training_continues_from_a_bundled_model(world, tmp_path):
    """world build --tokenizer keeps a bundled model's vocabulary, so train-mini --init can continue it."""
    from tokenizers import Tokenizer

    bundled_tok = BUNDLED["mini-draft"] / "tokenizer.json"
    w2 = tmp_path / "w2"
    build_world(WorldConfig(out=str(w2), duration="500ms", train=2, test=1, width=32, height=24,
                            clips_per_sequence=2, mp4=False, tokenizer=str(bundled_tok)), progress=False)  # fmt: skip
    assert Tokenizer.from_file(str(w2 / "tokenizer.json")).get_vocab() == Tokenizer.from_file(
        str(bundled_tok)).get_vocab()  # fmt: skip
    base = dict(role="draft", out=str(tmp_path / "cont"), duration="500ms", steps=2, clips_per_batch=2,
                questions_per_clip=1, lr=1e-3, warmup=1, eval_clips=1, device="cpu", init="mini-draft")  # fmt: skip
    manifest = train_mini(TrainConfig(world=str(w2), **base), progress=False)
    assert manifest["train_config"]["init"] == "mini-draft"
    before, after = load_model("mini-draft"), load_model(str(tmp_path / "cont"))
    assert before.vocab_size == after.vocab_size
    # the bundled draft was trained on centre crops, and its continuation keeps that view
    assert before.image_processor.do_center_crop and after.image_processor.do_center_crop
    changed = [not torch.equal(a, b) for a, b in zip(before.model.parameters(), after.model.parameters(), strict=True)]
    assert any(changed), "two steps of training moved the weights"
    with pytest.raises(SpecalignError, match="tokenizer differs"):
        train_mini(TrainConfig(world=str(world), **base), progress=False)
    with pytest.raises(SpecalignError, match="cannot continue as the draft"):
        train_mini(TrainConfig(world=str(w2), **{**base, "init": "mini-target"}), progress=False)


def test_fresh_scenes_flow_into_training(world, tmp_path, capsys):
    """--fresh-scenes: never-seen drives rendered by worker processes join the buffer between steps."""
    base = dict(world=str(world), duration="500ms", steps=3, clips_per_batch=2, questions_per_clip=1, warmup=1,
                eval_clips=1, device="cpu", sizes=TINY, fresh_scenes=True, fresh_buffer=4)  # fmt: skip
    manifest = train_mini(TrainConfig(role="target", out=str(tmp_path / "t"), **base), progress=False)
    assert manifest["fresh_clips"] >= 1 and manifest["train_config"]["fresh_scenes"]
    with pytest.raises(SpecalignError, match="event camera"):
        train_mini(TrainConfig(role="draft", out=str(tmp_path / "d"), **base), progress=False)
    # the CLI, continuing the tiny model just trained (the CLI's own sizes are the bundled ones: slow on a CPU)
    out = tmp_path / "cli"
    main(["models", "train-mini", "--role", "target", "--world", str(world), "--out", str(out), "--duration", "500ms",
          "--steps", "2", "--clips-per-batch", "2", "--questions-per-clip", "1", "--eval-clips", "1", "--device",
          "cpu", "--init", str(tmp_path / "t"), "--fresh-scenes", "--fresh-buffer", "6", "--fresh-workers", "1",
          "--quiet"])  # fmt: skip
    assert "fresh scenes from 1 worker processes, buffer 6 clips" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fresh_clips"] >= 1 and manifest["train_config"]["fresh_workers"] == 1


def test_a_target_trains_at_another_input_size(tmp_path, capsys):
    """--frame-scale 2 frames into a 2x vision input with 2x patches: finer pixels, as many visual tokens."""
    big = tmp_path / "big"
    build_world(WorldConfig(out=str(big), duration="500ms", train=2, test=1, width=32, height=24, frame_scale=2,
                            clips_per_sequence=2, mp4=False), progress=False)  # fmt: skip
    out = tmp_path / "t"
    cfg = TrainConfig(role="target", world=str(big), out=str(out), duration="500ms", steps=2, clips_per_batch=1,
                      questions_per_clip=1, eval_clips=1, device="cpu", sizes=TINY, image_size=56,
                      patch_size=28)  # fmt: skip
    assert (cfg.sizes.image_size, cfg.sizes.patch_size, cfg.sizes.lm_hidden) == (56, 28, TINY.lm_hidden)
    train_mini(cfg, progress=False)
    vlm = load_model(str(out))
    vc = vlm.model.config.vision_config
    assert (vc.image_size, vc.patch_size) == (56, 28)
    sample = open_dataset(big / "my_egpt_dsec_seq_500ms")[0]
    assert sample.frames(8).shape == (8, 48, 64, 3)
    assert vlm.visual_inputs(sample)["pixel_values_videos"].shape[-2:] == (56, 56)
    # the CLI refuses a size for a model that keeps its own, before any work
    args = ["models", "train-mini", "--role", "target", "--world", str(big), "--out", str(tmp_path / "c"),
            "--duration", "500ms", "--device", "cpu", "--image-size", "56", "--init", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 2
    assert "keeps its own sizes" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_deepened_target_computes_the_same_and_trains_on(world, tmp_path, capsys):
    """deepen_target adds layers that start as the identity: same logits, same answers, saved and reloaded at the
    new depth; train-mini --init --add-lm-layers/--add-vision-layers trains the deeper model on."""
    from dataclasses import replace

    from specalign.models.surgery import deepen_target

    out = tmp_path / "t"
    cfg = TrainConfig(role="target", world=str(world), out=str(out), duration="500ms", steps=3, clips_per_batch=2,
                      questions_per_clip=2, lr=3e-3, warmup=1, eval_clips=1, device="cpu",
                      sizes=replace(TINY, vision_layers=2))  # fmt: skip
    train_mini(cfg, progress=False)
    vlm = load_model(str(out), dtype="fp32")
    prompts = [vlm.prepare(open_dataset(world / "my_egpt_dsec_seq_500ms")[i], "Describe the scene.") for i in (0, 1)]
    batch = vlm.collate(prompts)

    def logits():
        with torch.no_grad():
            return vlm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             **vlm.visual_kwargs(batch.visual)).logits  # fmt: skip

    before, answers = logits(), vlm.generate(prompts, max_new_tokens=12)
    n = sum(p.numel() for p in vlm.model.parameters())
    deepen_target(vlm, vision_layers=1, lm_layers=2)
    assert torch.allclose(logits(), before, atol=1e-5)
    assert vlm.generate(prompts, max_new_tokens=12) == answers
    assert sum(p.numel() for p in vlm.model.parameters()) > n
    vlm.save(tmp_path / "deep")
    again = load_model(str(tmp_path / "deep"), dtype="fp32")
    assert again.model.config.text_config.num_hidden_layers == 3
    assert again.model.config.vision_config.num_hidden_layers == 3
    assert again.generate(prompts, max_new_tokens=12) == answers
    # the new layers are in the computation (same logits could also mean skipped layers): nudge each, logits move
    vision = vlm.model.model.video_tower.encoder.layers[1]  # inserted before the last of 2 + 1
    for linear in (vlm.model.model.language_model.layers[-1].mlp.down_proj, vision.mlp.fc2):
        with torch.no_grad():
            linear.weight.normal_(std=0.02)
        assert not torch.allclose(logits(), before, atol=1e-5)
        with torch.no_grad():
            linear.weight.zero_()

    args = ["models", "train-mini", "--role", "target", "--world", str(world), "--out", str(tmp_path / "cont"),
            "--duration", "500ms", "--steps", "2", "--clips-per-batch", "1", "--questions-per-clip", "1",
            "--eval-clips", "1", "--device", "cpu", "--quiet", "--add-lm-layers", "1"]  # fmt: skip
    assert main([*args, "--init", str(out)]) in (0, None)
    assert load_model(str(tmp_path / "cont")).model.config.text_config.num_hidden_layers == 2
    capsys.readouterr()
    assert main(args) == 2  # no --init: nothing to deepen
    assert "--init" in capsys.readouterr().err
    assert main([*args[:-1], "-1", "--init", str(out)]) == 2
    assert "--add-lm-layers" in capsys.readouterr().err


def test_a_draft_learns_the_targets_answers_from_an_extraction(world, tmp_path):
    """--teacher-pairs: the draft's labels are the target's greedy answers to the same clips (sequence-level
    distillation); an extraction of another split is refused before training."""
    from specalign.align.extract import ExtractConfig, extract
    from specalign.models.train_mini import teacher_answers

    split = world / "my_egpt_dsec_train_500ms"
    models = {}
    for role in ("target", "draft"):  # tiny models on this world's tokenizer (the bundled ones use another)
        models[role] = str(tmp_path / role)
        train_mini(TrainConfig(role=role, world=str(world), out=models[role], duration="500ms", steps=1,
                               clips_per_batch=1, questions_per_clip=1, warmup=0, eval_clips=1, device="cpu",
                               sizes=TINY), progress=False)  # fmt: skip
    pairs = tmp_path / "pairs"
    extract(ExtractConfig(dataset=str(split), out=str(pairs), questions=2, max_new_tokens=6, device="cpu",
                          **models), progress=False)  # fmt: skip
    answers = teacher_answers(pairs, split, None)
    lines = [json.loads(x) for x in (pairs / "pairs.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and [len(a) for a in answers] == [2] * 4
    first = next(x for x in lines if x["sample_idx"] == 0 and x["question_idx"] == 1)
    assert answers[0][1][0] == first["query"] and answers[0][1][1].tolist() == first["vl_tokens"]
    out = tmp_path / "distilled"
    cfg = TrainConfig(role="draft", world=str(world), out=str(out), duration="500ms", steps=2, clips_per_batch=2,
                      questions_per_clip=4, warmup=1, eval_clips=1, device="cpu", sizes=TINY,
                      teacher_pairs=str(pairs))  # fmt: skip
    manifest = train_mini(cfg, progress=False)
    assert manifest["train_config"]["teacher_pairs"] == str(pairs)
    other = tmp_path / "other"
    extract(ExtractConfig(dataset=str(world / "my_egpt_dsec_seq_500ms"), out=str(other), max_new_tokens=4,
                          device="cpu", **models), progress=False)  # fmt: skip
    with pytest.raises(SpecalignError, match="other: extracted from another split"):
        train_mini(replace(cfg, out=str(tmp_path / "d2"), teacher_pairs=str(other)), progress=False)
    bundled = tmp_path / "bundled"  # the bundled target speaks another tokenizer than this world's
    extract(ExtractConfig(dataset=str(split), out=str(bundled), max_new_tokens=4, device="cpu"), progress=False)
    with pytest.raises(SpecalignError, match="bundled: its target mini-target does not use this world's tokenizer"):
        train_mini(replace(cfg, out=str(tmp_path / "d3"), teacher_pairs=str(bundled)), progress=False)
    with pytest.raises(SpecalignError, match="--teacher-pairs: only the draft"):
        TrainConfig(role="target", world="w", out="o", teacher_pairs=str(pairs))
