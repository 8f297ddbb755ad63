"""inspect_model: every check of load_model that needs no weights, for each backend; load_model and inspect_model
find a hub id in the local Hugging Face cache without being told the backend; bad models fail on one line."""

import shutil

import pytest
from tiny_eventgpt import write_tiny_eventgpt
from tiny_video_llava import edit_json, fake_hub_cache, one_line_error, write_tiny_llava, write_tiny_video_llava

from specalign.errors import SpecalignError
from specalign.models import inspect_model, load_model, weights_stamp
from specalign.models.registry import BUNDLED

WRITERS = {"video-llava": write_tiny_video_llava, "eventgpt": write_tiny_eventgpt, "llava": write_tiny_llava}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {backend: write(root / backend) for backend, write in WRITERS.items()}


@pytest.mark.parametrize("backend", list(WRITERS))
def test_inspect_reports_the_model_without_reading_weights(backend, checkpoints, tmp_path):
    ckpt = checkpoints[backend]
    info = inspect_model(str(ckpt))
    vlm = load_model(str(ckpt))
    assert info.pop("tokenizer").get_vocab() == vlm.tokenizer.get_vocab()
    assert info == {"path": str(ckpt.resolve()), "backend": backend, "vocab_size": vlm.vocab_size,
                    "tokenizer_size": len(vlm.tokenizer)}  # fmt: skip
    # weights that cannot be read pass inspection (nothing is read) and fail the load, on one line
    broken = shutil.copytree(ckpt, tmp_path / "broken")
    for f in broken.glob("model*.safetensors"):
        f.write_bytes(b"\0" * 64)
    assert inspect_model(str(broken))["backend"] == backend
    with pytest.raises(SpecalignError) as e:
        load_model(str(broken))
    one_line_error(e, broken)


def test_hub_id_from_the_local_cache_needs_no_backend(checkpoints, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = fake_hub_cache(tmp_path / "hf-cache", "LanguageBind/Video-LLaVA-tiny-hf", checkpoints["video-llava"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    info = inspect_model("LanguageBind/Video-LLaVA-tiny-hf")
    assert info["backend"] == "video-llava" and str(cache) in info["path"]
    vlm = load_model("LanguageBind/Video-LLaVA-tiny-hf")
    assert vlm.kind == "video-llava" and vlm.name == "LanguageBind/Video-LLaVA-tiny-hf"
    assert weights_stamp("LanguageBind/Video-LLaVA-tiny-hf")  # resumed jobs notice re-downloaded weights
    with pytest.raises(SpecalignError) as e:
        inspect_model("LanguageBind/Video-LLaVA-not-cached")
    msg = one_line_error(e, "LanguageBind/Video-LLaVA-not-cached")
    assert "local Hugging Face cache" in msg and "--backend" not in msg


def _remove(d, name):
    target = d / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()


def _bad(backend, change):
    def make(checkpoints, tmp_path):
        d = shutil.copytree(checkpoints[backend], tmp_path / "bad")
        change(d)
        return d

    return make


BAD = {  # case -> (how to spoil a copy of a tiny checkpoint, the file the message names, words in it)
    "no weights": (_bad("video-llava", lambda d: _remove(d, "model.safetensors")), "", "no weights found"),
    "missing shard": (
        _bad("eventgpt", lambda d: _remove(d, "model-00002-of-00002.safetensors")),
        "model-00002-of-00002.safetensors",
        "missing",
    ),
    "corrupt weight index": (
        _bad("eventgpt", lambda d: (d / "model.safetensors.index.json").write_text("{")),
        "model.safetensors.index.json",
        "not a weight index",
    ),
    "no tokenizer": (_bad("llava", lambda d: _remove(d, "tokenizer.json")), "", "no tokenizer"),
    "corrupt tokenizer": (
        _bad("video-llava", lambda d: (d / "tokenizer.json").write_text("{nope")),
        "",
        "cannot load the tokenizer",
    ),
    "unknown model_type": (
        _bad("video-llava", lambda d: edit_json(d / "config.json", model_type="gpt2")),
        "config.json",
        "unknown model_type 'gpt2'",
    ),
    "no CLIP tower": (_bad("eventgpt", lambda d: _remove(d, "clip-tiny")), "config.json", "mm_visual_tower"),
    "CLIP tower without image processor": (
        _bad("eventgpt", lambda d: _remove(d, "clip-tiny/preprocessor_config.json")),
        "clip-tiny",
        "preprocessor_config.json",
    ),
    "tokenizer larger than embeddings": (
        _bad("video-llava", lambda d: edit_json(d / "config.json", text_config={"vocab_size": 100})),
        "",
        "123 tokens",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_models_fail_inspection_on_one_line(case, checkpoints, tmp_path):
    make, where, words = BAD[case]
    d = make(checkpoints, tmp_path)
    with pytest.raises(SpecalignError) as e:
        inspect_model(str(d))
    assert words in one_line_error(e, d / where if where else d)


def test_no_such_model_and_missing_bundled_model(tmp_path, monkeypatch):
    with pytest.raises(SpecalignError) as e:
        inspect_model(str(tmp_path / "nowhere"))
    msg = one_line_error(e, tmp_path / "nowhere")
    assert "not a bundled name" in msg and "Hugging Face cache" in msg and "--backend" not in msg
    monkeypatch.setitem(BUNDLED, "mini-target", tmp_path / "gone")
    with pytest.raises(SpecalignError) as e:
        load_model("mini-target")
    assert "bundled model 'mini-target' is missing" in one_line_error(e, tmp_path / "gone")
    with pytest.raises(SpecalignError) as e:
        inspect_model("mini-draft", backend="gpt")
    assert "unknown backend 'gpt'" in one_line_error(e, "--backend")


def test_eventgpt_clip_tower_from_the_hub_cache(checkpoints, tmp_path, monkeypatch):
    """mm_visual_tower may name the tower by hub id (as EventGPT's own config does): found in the local cache."""
    import huggingface_hub.constants

    d = shutil.copytree(checkpoints["eventgpt"], tmp_path / "ck")
    edit_json(d / "config.json", mm_visual_tower="openai/clip-vit-tiny")
    tower = d / "clip-tiny"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SpecalignError) as e:
        inspect_model(str(d))
    assert "not in the local Hugging Face cache" in one_line_error(e, d / "config.json")
    cache = fake_hub_cache(tmp_path / "hf-cache", "openai/clip-vit-tiny", tower)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    shutil.rmtree(tower)
    assert inspect_model(str(d))["backend"] == "eventgpt"
    assert load_model(str(d)).model.vision_tower.config.image_size == 30
