"""The bundled mini models in bf16 on the GPU (run on the GPU machine: pytest -m gpu)."""

import pytest
import torch

from specalign.data import open_dataset
from specalign.models import load_model
from specalign.world.build import WorldConfig, build_world

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=0, test=2, clips_per_sequence=2, mp4=False), progress=False)
    return open_dataset(out / "my_egpt_dsec_seq_1s")[0]


@pytest.mark.parametrize("name", ["mini-target", "mini-draft"])
def test_bundled_model_answers_in_bf16_on_gpu(name, sample):
    gpu = load_model(name, device="cuda", dtype="bf16")
    assert gpu.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    question = "What are the key elements in this scene?"
    answer = gpu.answer(sample, question)
    assert len(answer.split()) >= 8, answer
    assert gpu.answer(sample, question) == answer, "greedy decoding is deterministic"
    # bf16 on the GPU computes the same function as fp32 on the CPU, up to bf16 rounding
    cpu = load_model(name, device="cpu", dtype="fp32")
    prompt = cpu.prepare(sample, question)
    _, ref = cpu.prefill(cpu.collate([prompt]))
    _, got = gpu.prefill(gpu.collate([prompt]))
    ref, got = ref.logits[0, -1], got.logits[0, -1].cpu()
    assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) < 3e-2
    assert int(got.argmax()) == int(ref.argmax())
