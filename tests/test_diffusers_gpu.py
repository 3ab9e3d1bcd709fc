"""diffusers machinery on the DiT, on a GPU: ``from_pretrained`` straight onto the device,
``enable_group_offload`` with streams, and a PEFT adapter under the fused bf16 path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longcat_tools.cli import main

pytestmark = pytest.mark.gpu
PEFT_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def model_cls():
    from longcat_tools import LongCatTransformer3DModel

    return LongCatTransformer3DModel


def _inputs(dit):
    from longcat_tools.runner.compare import probe_inputs

    return probe_inputs(dit, frames=5, size=16, device="cuda")


def test_from_pretrained_onto_the_gpu(tiny_native, model_cls):
    cpu = model_cls.from_pretrained(tiny_native, torch_dtype=torch.bfloat16)
    gpu = model_cls.from_pretrained(tiny_native, torch_dtype=torch.bfloat16, device="cuda")
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    want = cpu.state_dict()
    assert all(torch.equal(v.cpu(), want[k]) for k, v in gpu.state_dict().items())


def test_group_offload_with_streams_equals_resident(tiny_native, model_cls):
    resident = model_cls.from_pretrained(tiny_native, torch_dtype=torch.bfloat16, device="cuda")
    resident.enable_fast_ops(True)
    x = _inputs(resident)
    with torch.no_grad():
        want = resident(**x)
    offloaded = model_cls.from_pretrained(tiny_native, torch_dtype=torch.bfloat16)
    offloaded.enable_fast_ops(True)
    offloaded.enable_group_offload(onload_device=torch.device("cuda"),
                                   offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=True)
    with torch.no_grad():
        got = offloaded(**x)
    assert torch.equal(got, want)
    assert next(offloaded.blocks[0].parameters()).device.type == "cpu"


def test_peft_adapter_under_the_fused_bf16_path(tiny_native, model_cls, tmp_path: Path):
    assert main(["lora", "export", "distilled", "--format", "peft", "--keys", "native", "-m",
                 str(tiny_native), "--out", str(tmp_path / PEFT_FILE), "-q"]) == 0
    ours = model_cls.from_pretrained(tiny_native, torch_dtype=torch.bfloat16, device="cuda")
    ours.lora_mode = "runtime"  # as PEFT adds its delta (a merge into bf16 weights rounds)
    ours.load_lora(str(tiny_native / "lora" / "cfg_step_lora.safetensors"), "distilled")
    ours.enable_loras(["distilled"])
    peft = model_cls.from_pretrained(tiny_native, torch_dtype=torch.bfloat16, device="cuda")
    peft.load_lora_adapter(str(tmp_path), weight_name=PEFT_FILE, adapter_name="distilled",
                           prefix="transformer")
    plain = model_cls.from_pretrained(tiny_native, torch_dtype=torch.bfloat16, device="cuda")
    for m in (ours, peft, plain):
        m.enable_fast_ops(True)
    x = _inputs(ours)
    with torch.no_grad():
        a, b, c = ours(**x), peft(**x), plain(**x)
    effect = (a - c).abs().max()
    assert effect > 0.01 * a.abs().max(), "the adapter changed nothing"  # 3% on the CPU
    assert (a - b).abs().max() <= 0.1 * effect  # equal on the CPU; allow rounding differences


def test_our_loras_follow_group_offload_to_the_gpu(tiny_native, model_cls):
    """Adapters enabled while the offloaded weights sit on the CPU move to the GPU on use."""
    lora = str(tiny_native / "lora" / "cfg_step_lora.safetensors")
    resident = model_cls.from_pretrained(tiny_native, torch_dtype=torch.bfloat16, device="cuda")
    resident.lora_mode = "runtime"  # group offload runs its adapters at run time: compare alike
    resident.load_lora(lora, "distilled")
    resident.enable_loras(["distilled"])
    x = _inputs(resident)
    offloaded = model_cls.from_pretrained(tiny_native, torch_dtype=torch.bfloat16)
    offloaded.enable_group_offload(onload_device=torch.device("cuda"),
                                   offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=True)
    offloaded.load_lora(lora, "distilled")
    offloaded.enable_loras(["distilled"])
    with torch.no_grad():
        assert torch.equal(offloaded(**x), resident(**x))
