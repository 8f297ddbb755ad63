"""The one-token step through `decode.gemv`'s Triton kernels computes what the model's own modules compute (in
Triton's interpreter on the CPU; on the GPU in test_engine_gpu.py), and layers the kernels do not compute are
refused before any work."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))  # the tiny checkpoint writers

from tiny_video_llava import write_tiny_video_llava  # noqa: E402

from specalign.decode.engine import Engine  # noqa: E402
from specalign.errors import SpecalignError  # noqa: E402
from specalign.models.video_llava import load_video_llava  # noqa: E402

INTERPRETED = """
import sys, torch
from specalign.decode.engine import Engine, prefill, decode_one_token
from specalign.models.video_llava import load_video_llava
vlm = load_video_llava(sys.argv[1])
n = vlm.model.config.text_config.num_hidden_layers
x = torch.randn(1, 7, vlm.model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
logits, feats = {}, {}
for gemv in (False, True):
    engine = Engine(vlm, 24, attention="split", gemv=gemv, features=(0, n))
    with torch.inference_mode():
        steps = [prefill(engine, x)]
        for token in (5, 11, 3, 40):  # each step writes its key and value where the next one reads them
            steps.append(decode_one_token(engine, torch.tensor([token])))
    logits[gemv], feats[gemv] = torch.stack(steps), engine.features
torch.testing.assert_close(logits[True], logits[False], atol=2e-4, rtol=2e-4)
torch.testing.assert_close(feats[True], feats[False], atol=2e-4, rtol=2e-4)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_gemv_step_computes_the_model_step_in_the_interpreter(tmp_path):
    path = write_tiny_video_llava(tmp_path / "v")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when the kernels are defined: a fresh process
    r = subprocess.run([sys.executable, "-c", INTERPRETED, str(path)], env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_gemv_refuses_what_its_kernels_do_not_compute(tmp_path):
    vlm = load_video_llava(write_tiny_video_llava(tmp_path / "v"))
    for options in ({}, {"batch": 2, "attention": "split"}, {"compile": True, "attention": "split"}):
        with pytest.raises(SpecalignError, match="gemv needs attention='split', batch 1 and no compile"):
            Engine(vlm, 16, gemv=True, **options)
    attn = vlm.model.model.language_model.layers[1].self_attn
    attn.q_proj.bias = torch.nn.Parameter(torch.zeros(attn.q_proj.out_features))
    with pytest.raises(SpecalignError, match="no biases"):
        Engine(vlm, 16, attention="split", gemv=True)
    attn.q_proj.bias = None
    vlm.model.model.language_model.layers[0].mlp.act_fn = torch.nn.GELU()
    with pytest.raises(SpecalignError, match="needs a SiLU MLP, not GELU"):
        Engine(vlm, 16, attention="split", gemv=True)
