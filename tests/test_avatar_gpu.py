"""The avatar DiT and pipeline on a GPU (tiny synthetic 1.5 tree, bf16): the same numbers as on
the CPU, the INT8 folder dequantized per forward, block swap with INT8 layers equal to the
resident model bit for bit, and one offloaded ``run --task ai2v --distill --int8`` from the CLI.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from avatar_media import speech, write_wav
from PIL import Image

from longcat_tools.cli import main
from longcat_tools.runner import video
from longcat_tools.runner.avatar_dit import load_avatar_transformer
from longcat_tools.runner.avatar_pipeline import LongCatVideoAvatarPipeline
from longcat_tools.runner.int8_linear import Int8Linear
from longcat_tools.runner.offload import PIN_FROM_USE, enable_block_swap
from longcat_tools.synth import synth

pytest.importorskip("onnx")  # synth writes the avatar's vocal separator with it

pytestmark = pytest.mark.gpu
# bf16 on two devices: the CPU's and the GPU's kernels round in different orders (SDPA: math vs
# cuDNN/flash). On this tree bf16 is 6e-3 from fp32 on the CPU, so two bf16 runs should be about
# 1e-2 apart at most; 2e-2 leaves room and still catches a wrong layer or a dropped term.
DEVICE_TOL = 2e-2
# INT8 rows round each weight by up to half a step (row max / 254); on this tree the INT8 folder
# is 1.4e-2 from base_model in bf16 on the CPU.
INT8_TOL = 5e-2


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatar-gpu")
    synth(root / "t15", "tiny", model="avatar-1.5", seed=0, dtype="bf16")
    wav = write_wav(root / "a.wav", speech(1.2))
    face = root / "face.png"
    Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8)).save(face)
    return {"root": root / "t15" / "LongCat-Video-Avatar-1.5", "wav": wav, "face": face}


def inputs(dit, device: str, seed: int = 0) -> tuple:
    """Latents [1, C, 3, 8, 8], timestep, text [1, 1, 16, C_txt], mask, audio [1, 9, 5, S, C]
    (9 video frames: the 3 latent frames), in the DiT's dtype on ``device``."""
    g = torch.Generator().manual_seed(seed)
    d, a = dit.dims, dit.audio
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    text = torch.randn(1, 1, 16, d.caption_channels, generator=g)
    audio = torch.randn(1, 9, a.audio_window, a.audio_block, a.audio_channel, generator=g)
    dt = torch.bfloat16
    return (x.to(device, dt), torch.full((1,), 500.0).to(device, dt), text.to(device, dt),
            torch.ones(1, 16, dtype=torch.long, device=device), audio.to(device))


def forward(dit, device: str) -> torch.Tensor:
    x, t, text, mask, audio = inputs(dit, device)
    with torch.no_grad():
        return dit(x, t, text, mask, audio_embs=audio).float().cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_the_avatar_dit_on_the_gpu_is_the_cpu_one(tree):
    folder = tree["root"] / "base_model"
    gpu = forward(load_avatar_transformer(folder, "cuda", "bf16"), "cuda")
    cpu = forward(load_avatar_transformer(folder, "cpu", "bf16"), "cpu")
    assert torch.isfinite(gpu).all() and cpu.abs().sum() > 0
    assert rel(gpu, cpu) < DEVICE_TOL, rel(gpu, cpu)


def test_the_int8_folder_on_the_gpu_stays_int8_and_is_close_to_bf16(tree):
    dit = load_avatar_transformer(tree["root"] / "base_model_int8", "cuda", "bf16")
    layers = [m for m in dit.modules() if isinstance(m, Int8Linear)]
    assert layers
    for m in layers:  # kept in the format: dequantized in each forward, never stored as bf16
        assert m.weight_int8.dtype == torch.int8 and m.weight_int8.is_cuda
        assert m.weight_scale.dtype == torch.float32 and m.weight_scale.is_cuda
    out = forward(dit, "cuda")
    base = forward(load_avatar_transformer(tree["root"] / "base_model", "cuda", "bf16"), "cuda")
    assert torch.isfinite(out).all()
    assert 0 < rel(out, base) < INT8_TOL, rel(out, base)  # 0: the INT8 weights did load


def test_block_swap_with_int8_layers_equals_the_resident_model_bit_for_bit(tree):
    folder = tree["root"] / "base_model_int8"
    resident = forward(load_avatar_transformer(folder, "cuda", "bf16"), "cuda")
    dit = load_avatar_transformer(folder, "cpu", "bf16")
    swap = enable_block_swap(dit, "cuda")
    assert swap.stream is not None  # the next block is prefetched on a side stream
    for _ in range(2):  # a second forward reuses the pinned host copies
        assert torch.equal(forward(dit, "cuda"), resident)
    assert swap.loads == list(range(len(dit.blocks))) * 2
    layers = [m for b in dit.blocks for m in b.modules() if isinstance(m, Int8Linear)]
    assert layers
    for m in layers:  # back in pinned host memory, in the format's dtypes
        assert not m.weight_int8.is_cuda and m.weight_int8.is_pinned()
        assert not m.weight_scale.is_cuda and m.weight_scale.is_pinned()
        assert (m.weight_int8.dtype, m.weight_scale.dtype) == (torch.int8, torch.float32)
    assert dit.x_embedder.proj.weight.is_cuda and dit.audio_proj.norm.weight.is_cuda


def test_offload_all_gives_the_resident_pipelines_latents(tree):
    """Same kernels on the same inputs: the offloaded run is bit for bit the resident one, and
    afterwards the encoders wait in host memory again, pinned only from ``PIN_FROM_USE``."""
    latents = {}
    for choice in ("none", "all"):
        pipe = LongCatVideoAvatarPipeline.from_pretrained(tree["root"], torch_dtype="bf16",
                                                          device="cuda", offload=choice)
        audio = pipe.audio_from_files([str(tree["wav"])], separate=False, seconds=9 / pipe.fps)
        r = pipe.at2v(audio.clip(0, 9), "a man talks", height=32, width=32, num_frames=9,
                      steps=2, decode=False)
        latents[choice] = r.latents.float().cpu()
        if choice == "all":
            for module in (pipe.text_encoder, pipe.audio_encoder.model):
                pinned = module._longcat_uses >= PIN_FROM_USE  # a job's few uses: not yet
                assert all(not p.is_cuda and p.is_pinned() == pinned
                           for p in module.parameters())
            assert all(not p.is_cuda for p in pipe.transformer.blocks.parameters())
        del pipe
        torch.cuda.empty_cache()
    assert latents["none"].abs().sum() > 0
    assert torch.equal(latents["all"], latents["none"])


def test_an_offloaded_int8_distilled_ai2v_run_writes_an_mp4_with_speech(tree, capsys):
    out = tree["root"].parent.parent / "ai2v.mp4"
    rc = main(["run", "-q", "-m", str(tree["root"]), "--task", "ai2v", "--image",
               str(tree["face"]), "--audio", str(tree["wav"]), "--distill", "--int8",
               "--offload", "all", "--no-vocal-separation", "--device", "cuda", "--height",
               "64", "--width", "64", "--frames", "9", "-p", "a man talks", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    info = video.probe(out)
    assert (info["codec"], info["frames"], info["fps"]) == ("h264", 9, 25)
    assert audio_codec(out).startswith("aac")
    doc = json.loads(Path(f"{out}.json").read_text())
    assert doc["settings"]["offload"] == "all" and doc["settings"]["device"].startswith("cuda")
    assert doc["avatar"]["int8"] is True and doc["final"]["steps"] == 8
    assert doc["final"]["loras"] and doc["final"]["merged_loras"] == []  # beside int8 layers


def audio_codec(path: Path) -> str:
    """ffmpeg's description of the file's audio stream ("" when it has none)."""
    import imageio_ffmpeg

    err = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                         capture_output=True, text=True).stderr
    m = re.search(r"Stream #\S+: Audio: (.*)", err)
    return m.group(1) if m else ""
