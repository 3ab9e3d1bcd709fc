"""fp8 mode and the loader on a GPU: the compiled per-token scaling, the e4m3 GEMM, loading
straight onto the device through pinned buffers, and LoRAs merged into e4m3 weights."""

from __future__ import annotations

import pytest
import torch

from longcat_tools import convert as conv
from longcat_tools.kernels import fp8 as ops
from longcat_tools.runner.loading import load_transformer

pytestmark = pytest.mark.gpu
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def fp8_folder(tiny_native, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fp8gpu") / "conv"
    conv.convert(tiny_native, dst, dtype="fp8")
    return dst


@pytest.mark.parametrize("shape", [(37, 4096), (512, 64), (3, 11008)])
@pytest.mark.parametrize("path", ["triton", "compiled"])
def test_fused_scaling_gives_the_bits_of_the_eager_one(shape, path):
    """The Triton row kernel (what CUDA runs) and the compiled function (its fallback)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(*shape, device="cuda", generator=g) * 3).bfloat16()
    x[1] = 0
    x[2, 7] = 3e4  # one loud channel sets its row's scale
    if shape[0] > 20:  # eager's NaN and inf rows: scale 1 and NaN kept; scale inf and NaN/0
        x[10, 3], x[11, 4], x[12, 5] = float("nan"), float("inf"), float("-inf")
    if path == "triton":
        q, s = ops.quantize_rows(x, fused=True)
    else:
        q, s = ops.quantize_rows_fused(x, ops._limit(x.device))
        assert ops.quantize_rows_fused.status == "compiled"
    rq, rs = ops.quantize_rows(x)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    cq, cs = ops.quantize_rows(x.cpu())
    # inf / inf makes a negative NaN on x86 and a positive one on CUDA (their default NaNs),
    # so the inf rows' NaN bytes may differ in sign: NaN where it is, every other byte equal
    q, nan = q.cpu(), q.cpu().float().isnan()
    assert torch.equal(s.cpu(), cs) and torch.equal(nan, cq.float().isnan())
    assert torch.equal(q.view(torch.uint8)[~nan], cq.view(torch.uint8)[~nan])


def test_the_e4m3_gemm_matches_the_dequantized_product():
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(4096, 4096, device="cuda", generator=g)
    x = torch.randn(2, 300, 4096, device="cuda", generator=g).bfloat16()
    bias = torch.randn(4096, device="cuda", generator=g).bfloat16()
    q, s = ops.quantize_weight(w)
    y = ops.linear(x, q, s, bias)
    rows = ops.quantize_input(x)
    assert rows.q.shape == x.shape and rows.scale.shape == (2, 300, 1)
    assert torch.equal(ops.linear(rows, q, s, bias), y)
    ref = (rows.q.double() * rows.scale.double()) @ (q.double() * s.double()[:, None]).T \
        + bias.double()
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert y.dtype == torch.bfloat16 and rel < 4e-3, rel


@pytest.mark.parametrize("fp8", [False, True])
def test_loading_onto_the_gpu_equals_loading_on_the_cpu(tiny_native, fp8_folder, fp8):
    for folder in (tiny_native, fp8_folder):
        gpu = load_transformer(folder, device="cuda", dtype="bf16", fp8=fp8).state_dict()
        cpu = load_transformer(folder, device="cpu", dtype="bf16", fp8=fp8).state_dict()
        assert set(gpu) == set(cpu)
        for name, t in cpu.items():
            assert gpu[name].dtype == t.dtype, name
            assert torch.equal(gpu[name].cpu().view(torch.uint8), t.view(torch.uint8)), name


def test_the_fp8_dit_on_the_gpu_is_the_cpu_one(fp8_folder):
    from longcat_tools.runner.compare import probe_inputs

    gpu = load_transformer(fp8_folder, device="cuda", dtype="bf16")
    gpu.fp8_attention = frozenset()  # attention in bf16 on both (no quantized kernel on a CPU)
    cpu = load_transformer(fp8_folder, device="cpu", dtype="bf16")
    x = probe_inputs(gpu, frames=5, size=16, device="cuda")
    with torch.no_grad():
        a = gpu(**x).float().cpu()
        b = cpu(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in x.items()}).float()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 2e-2, rel  # bf16 glue on two devices, same e4m3 GEMM inputs


def test_a_lora_merged_into_e4m3_weights_on_the_gpu_comes_back_bit_for_bit(tiny_native):
    from longcat_tools.runner.lora import lora_path

    model = load_transformer(tiny_native, device="cuda", dtype="bf16", fp8=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora(lora_path(tiny_native, "distilled"), "distilled")
    model.enable_loras(["distilled"])
    assert model.merged_loras == ["distilled"]
    model.disable_loras()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_loading_onto_a_second_gpu_waits_for_its_own_copies(tiny_native, fp8_folder):
    """The staging buffers are freed by events on the parameters' GPU, not the current one."""
    for folder, fp8 in ((tiny_native, False), (fp8_folder, None)):
        gpu = load_transformer(folder, device="cuda:1", dtype="bf16", fp8=fp8).state_dict()
        cpu = load_transformer(folder, device="cpu", dtype="bf16", fp8=fp8).state_dict()
        for name, t in cpu.items():
            assert gpu[name].device == torch.device("cuda:1")
            assert torch.equal(gpu[name].cpu().view(torch.uint8), t.view(torch.uint8)), name
