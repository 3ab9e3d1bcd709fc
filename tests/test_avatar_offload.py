"""``run --task at2v --offload ...`` on the tiny avatar 1.5 tree (fp32, CPU): block swap and the
encoders' offload change where weights wait, never the result. On the CPU the swap's hooks
still run (each block "loaded" before its forward and dropped after), so the final latents of an
offloaded run must equal a resident run's bit for bit; the GPU side is tests/test_avatar_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from avatar_media import speech, write_wav
from safetensors.torch import load_file

from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.model import avatar
from longcat_tools.runner import offload
from longcat_tools.runner.avatar_pipeline import LongCatVideoAvatarPipeline
from longcat_tools.runner.int8_linear import Int8Linear

pytest.importorskip("onnx")  # synth writes the avatar's vocal separator with it

TINY = ["--height", "32", "--width", "32", "--frames", "9", "-p", "a man talks",
        "--no-vocal-separation", "-q"]
DEPTH = 2  # the tiny tree's blocks
FORWARDS_PER_STEP = 2  # CFG on (the default guidance): [u_t; c] in one call, then u
ENCODES = ["WhisperEncoder"] + ["UMT5EncoderModel"] * 2  # the audio, the prompt, the negative


@pytest.fixture(scope="module")
def tree(avatar_trees, tmp_path_factory):
    wav = write_wav(tmp_path_factory.mktemp("avatar-offload") / "a.wav", speech(1.2))
    return avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder, wav


@pytest.fixture
def spy(monkeypatch):
    """Every BlockSwap attached and every module brought on device during a run."""
    seen: dict[str, list] = {"swaps": [], "on_device": []}
    attach, bring = offload.enable_block_swap, offload.on_device

    def enable_block_swap(model, device, **kw):
        swap = attach(model, device, **kw)
        seen["swaps"].append(swap)
        return swap

    def on_device(module, device, **kw):
        seen["on_device"].append(type(module).__name__)
        return bring(module, device, **kw)

    monkeypatch.setattr(offload, "enable_block_swap", enable_block_swap)
    monkeypatch.setattr(offload, "on_device", on_device)
    return seen


def latents_of(tree, tmp: Path, name: str, *args: str) -> torch.Tensor:
    root, wav = tree
    out = tmp / f"{name}.safetensors"
    steps = [] if "--steps" in args else ["--steps", "1"]
    rc = main(["run", "-m", str(root), "--task", "at2v", "--audio", str(wav), *TINY, *steps,
               "-o", str(tmp / f"{name}.mp4"), "--save-latents", str(out), *args])
    assert rc == 0
    return load_file(out)["latents"]


@pytest.mark.parametrize("int8", [False, True], ids=["bf16-folder", "int8-folder"])
def test_offload_all_gives_the_latents_of_a_resident_run(tree, tmp_path, spy, int8):
    extra = ["--int8"] if int8 else []
    resident = latents_of(tree, tmp_path, "resident", *extra)
    assert not spy["swaps"] and not spy["on_device"]
    offloaded = latents_of(tree, tmp_path, "offloaded", "--offload", "all", *extra)
    assert torch.equal(offloaded, resident)
    assert resident.abs().sum() > 0
    (swap,) = spy["swaps"]
    assert swap.loads == list(range(DEPTH)) * FORWARDS_PER_STEP  # every block, every forward
    # the speaker's track (before the task), then the prompt and the negative prompt
    assert spy["on_device"] == ENCODES
    if int8:  # INT8 layers' int8 weights and float32 scales travel with their block
        streamed = {id(t) for host in swap._host for t, _ in host}
        layers = [m for b in swap.blocks for m in b.modules() if isinstance(m, Int8Linear)]
        assert layers
        for m in layers:
            assert id(m.weight_int8) in streamed and id(m.weight_scale) in streamed
            assert m.weight_int8.dtype == torch.int8
            assert m.weight_scale.dtype == torch.float32


def test_the_dmd_lora_merges_into_streamed_blocks(tree, tmp_path, spy):
    """--distill merges the LoRA into the weights (merge mode): with block swap it lands in the
    host copies the swap streams, and the run equals the resident one."""
    distill = ["--distill", "--steps", "8"]
    resident = latents_of(tree, tmp_path, "resident", *distill)
    offloaded = latents_of(tree, tmp_path, "offloaded", "--offload", "dit", *distill)
    assert torch.equal(offloaded, resident)
    (swap,) = spy["swaps"]
    assert swap.loads == list(range(DEPTH)) * 8  # 8 steps, no CFG


@pytest.mark.parametrize("choice, swaps, encoders", [
    ("dit", 1, []), ("text-encoder", 0, ENCODES)])
def test_each_offload_choice_does_its_part(tree, tmp_path, spy, choice, swaps, encoders):
    latents_of(tree, tmp_path, choice, "--offload", choice)
    assert len(spy["swaps"]) == swaps
    assert spy["on_device"] == encoders


def test_the_pipeline_api_takes_offload(tree):
    root, _ = tree
    pipe = LongCatVideoAvatarPipeline.from_pretrained(root, offload="all")
    assert isinstance(pipe.transformer.block_swap, offload.BlockSwap)
    assert pipe.offload_text_encoder
    with pytest.raises(LongcatError, match="offload=cpu: unknown"):
        LongCatVideoAvatarPipeline.from_pretrained(root, offload="cpu")
    with pytest.raises(LongcatError, match="device=gpu: not a device"):  # torch's device list
        LongCatVideoAvatarPipeline.from_pretrained(root, device="gpu")
    for call in (pipe, pipe.t2v, pipe.i2v, pipe.vc, pipe.long, pipe.refine):  # the base model's:
        with pytest.raises(LongcatError, match="the avatar pipeline runs at2v, ai2v and avc"):
            call(prompt="a man talks")  # they failed in the DiT, wanting audio, after UMT5 ran


def test_an_unknown_offload_is_one_line(tree, capsys):
    root, wav = tree
    rc = main(["run", "-m", str(root), "--task", "at2v", "--audio", str(wav), *TINY,
               "--offload", "gpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "--offload gpu: unknown" in err and err.count("\n") == 1, err
