"""`specalign distill` on the real layouts (a tiny random EventGPT-7B-layout draft, a Video-LLaVA-7B-hf-layout
target, both on Llama's 32,000 ids): LoRA on the LM's decoder projections lowers the CE on the target's answers,
the merged checkpoint is base + adapter, nothing else changes, bad inputs are refused before a model loads, and a
killed run resumes to exactly the weights of an unbroken one."""

import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))  # the tiny checkpoint writers

from processes import interrupt_at_call  # noqa: E402
from tiny_eventgpt import write_tiny_eventgpt  # noqa: E402
from tiny_video_llava import write_tiny_video_llava  # noqa: E402

import specalign.models  # noqa: E402
from specalign.align.distill import LORA_TARGETS, DistillConfig, _answers, _prompt_rows, answer_metrics, distill  # noqa: E402
from specalign.align.extract import ExtractConfig, extract  # noqa: E402
from specalign.cli import main  # noqa: E402
from specalign.data import open_dataset  # noqa: E402
from specalign.errors import SpecalignError  # noqa: E402
from specalign.models import load_model  # noqa: E402
from specalign.models.train_mini import load_visual_inputs  # noqa: E402
from specalign.world.build import WorldConfig, build_world  # noqa: E402

SHARED = 32000  # Llama's ids: what the draft and the target share


def sharpen_head(checkpoint: Path, scale: float = 30.0) -> None:
    """A random LM head (std 0.02) over a normed state cannot give any token a logit above about 0.6, so the CE
    could hardly fall whatever the decoder learns (a trained 7B's head can): scale it up in its shard."""
    from safetensors.torch import load_file, save_file

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = checkpoint / index["weight_map"]["lm_head.weight"]
    tensors = load_file(str(shard))
    tensors["lm_head.weight"] *= scale
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(world, draft, target, train extraction, test extraction)."""
    root = tmp_path_factory.mktemp("distill")
    world = root / "world"
    build_world(WorldConfig(out=str(world), duration="500ms", train=4, test=2, width=32, height=24,
                            clips_per_sequence=2, mp4=False), progress=False)  # fmt: skip
    draft = write_tiny_eventgpt(root / "EventGPT-7B", llama_vocab=world / "tokenizer.json")
    sharpen_head(draft)
    target = write_tiny_video_llava(root / "Video-LLaVA-7B-hf", llama_vocab=world / "tokenizer.json")
    runs = {}
    for split in ("train", "seq"):
        runs[split] = root / f"pairs-{split}"
        extract(ExtractConfig(dataset=str(world / f"my_egpt_dsec_{split}_500ms"), out=str(runs[split]),
                              draft=str(draft), target=str(target), questions=2, max_new_tokens=8, device="cpu"),
                progress=False)  # fmt: skip
    return world, draft, target, runs["train"], runs["seq"]


@pytest.fixture(scope="module")
def config(setup, tmp_path_factory):
    world, draft, _, pairs, eval_pairs = setup
    return DistillConfig(draft=str(draft), pairs=str(pairs), dataset=str(world / "my_egpt_dsec_train_500ms"),
                         out=str(tmp_path_factory.mktemp("run") / "out"), eval_pairs=str(eval_pairs), lora_rank=4,
                         lora_alpha=8, steps=24, batch_size=4, lr=3e-2, warmup=2, checkpoint_every=100,
                         device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def finished(config):
    return distill(config, progress=False)


def rows(vlm, cfg):
    """The scored rows and visual inputs of the train extraction, on `vlm`'s prompt."""
    answers = _answers(Path(cfg.pairs), SHARED)
    visual = dict(enumerate(load_visual_inputs(vlm, open_dataset(cfg.dataset), max(answers) + 1, False)))
    return _prompt_rows(vlm, answers, visual), visual


def test_distill_lowers_the_ce_and_the_merged_draft_is_base_plus_adapter(config, finished, capsys):
    from peft import PeftModel

    out = Path(config.out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    m = json.loads((out / "manifest.json").read_text())
    assert m == finished and not (out / "train_state.pt").exists()
    assert 0 < m["parameters"]["trained"] < m["parameters"]["total"] / 10
    assert m["held_out_source"] == config.eval_pairs and m["held_out"]["after"]["answers"] == 4  # 2 clips x 2 qs
    base, merged = load_model(config.draft), load_model(str(out))  # the merged draft loads as any checkpoint
    assert merged.kind == "eventgpt"
    train_rows, visual = rows(base, config)
    before, after = (answer_metrics(v, train_rows, visual, SHARED, 4) for v in (base, merged))
    assert after["loss"] < before["loss"] - 2, (before, after)  # 15.6 -> 11.5 nats (random 8-token answers)
    # base + adapter (peft) and the merged weights compute the same logits
    adapted = PeftModel.from_pretrained(load_model(config.draft).model, str(out / "adapter")).eval()
    batch = base.collate([base.prepare(open_dataset(config.dataset)[0], "Describe the scene.")])
    args = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **base.visual_kwargs(batch.visual))
    with torch.no_grad():
        want, got, plain = adapted(**args).logits, merged.model(**args).logits, base.model(**args).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2, "the adapter changes the logits"
    # asked again: the finished run, not a second training
    capsys.readouterr()
    assert distill(config, progress=False) == finished
    assert "already holds this run, finished" in capsys.readouterr().out


def test_only_the_lms_decoder_projections_change(config, finished):
    from safetensors.torch import load_file

    lora = load_file(str(Path(config.out) / "adapter" / "adapter_model.safetensors"))
    assert lora and all("lora_" in k and "visual_tower" not in k for k in lora)
    kinds = {re.search(r"\.(\w+_proj)\.lora_", k).group(1) for k in lora}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base, merged = (load_model(p).model.state_dict() for p in (config.draft, config.out))
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(re.fullmatch(LORA_TARGETS + r"\.weight", k) for k in changed), sorted(changed)[:3]
    assert len(changed) == 7 * 2, "every projection of both layers; the tower, projector, embeddings, head untouched"


def test_bad_inputs_are_refused_on_one_line_before_a_model_loads(setup, config, finished, tmp_path, monkeypatch):
    world, _, target, pairs, eval_pairs = setup
    monkeypatch.setattr(specalign.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    unfinished = shutil.copytree(pairs, tmp_path / "unfinished")
    (unfinished / "manifest.json").unlink()
    foreign = shutil.copytree(pairs, tmp_path / "foreign")  # an answer id only the target has (<image>)
    lines = [json.loads(x) for x in (foreign / "pairs.jsonl").read_text().splitlines()]
    lines[1]["vl_tokens"][0] = SHARED
    (foreign / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    wrong = shutil.copytree(setup[1], tmp_path / "EventGPT-other-tokenizer")  # ids 100 and 101 swapped
    data = json.loads((wrong / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = [token for token, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (wrong / "tokenizer.json").write_text(json.dumps(data))
    fresh = str(tmp_path / "o")
    for change, message in (
        ({"pairs": str(eval_pairs)}, "pairs-seq: extracted from another split than"),
        ({"pairs": str(unfinished)}, "unfinished: not a finished extraction"),
        ({"eval_pairs": str(unfinished)}, "unfinished: not a finished extraction"),
        ({"eval_pairs": str(pairs)}, "pairs-train: extracted from the train split itself"),
        ({"draft": str(target)}, "a video-llava checkpoint; distill trains an EventGPT draft"),
        ({"draft": str(wrong)}, "have different tokenizers: 2 of the 32000 ids both should share differ"),
        ({"pairs": str(foreign)}, f"foreign: pair 1: answer id {SHARED} is not one the draft shares"),
        ({"out": config.out, "lr": 2e-2}, r"holds a run with other settings \(lr: 0.03 then, 0.02 now\)"),
    ):
        with pytest.raises(SpecalignError, match=message) as e:
            distill(replace(config, **{"out": fresh, **change}), progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(SpecalignError, match="--lora-dropout: must be below 1"):
        replace(config, lora_dropout=1.0)
    assert main(["distill", "--draft", str(target), "--pairs", str(pairs), "--dataset",
                 str(world / "my_egpt_dsec_train_500ms"), "--out", fresh, "--quiet"]) == 2  # fmt: skip
    assert not (tmp_path / "o" / "run_settings.json").exists()


def test_a_killed_run_resumes_to_the_unbroken_runs_weights(config, finished, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    cfg = replace(config, out=str(tmp_path / "killed"), checkpoint_every=5)
    real_step = interrupt_at_call(monkeypatch, torch.optim.AdamW, "step", 13)  # killed during the 13th step
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, progress=False)
    state = Path(cfg.out) / "train_state.pt"
    assert torch.load(state, weights_only=True)["step"] == 10, "the last checkpoint is kept"
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    m = distill(cfg, progress=False)
    assert "resuming at step 10" in capsys.readouterr().out and not state.exists()
    assert m["final_loss"] == finished["final_loss"] and m["held_out"] == finished["held_out"]
    got, want = (load_file(str(Path(o) / "adapter" / "adapter_model.safetensors")) for o in (cfg.out, config.out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), "as if never stopped"
