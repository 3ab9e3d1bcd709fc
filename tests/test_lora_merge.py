"""LoRA merge mode (``runner.lora_merge``): a fixed adapter set is added into the weights once,
with ``lora fuse``'s arithmetic, and taken out again bit for bit, from the checkpoint's shards or
from a host copy. Expected weights are computed here from the adapter files read by hand."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from hostile import refused
from runner_layouts import make_layout, native_state
from safetensors.torch import load_file, save_file

from longcat_tools.errors import LongcatError
from longcat_tools.runner import load_transformer, loading, lora_merge
from longcat_tools.runner.compare import probe_inputs
from longcat_tools.runner.dit import LongCatTransformer3DModel
from longcat_tools.runner.pipeline import LongCatVideoPipeline

CFG = "lora/cfg_step_lora.safetensors"
REF = "lora/refinement_lora.safetensors"
PREFIX, HYPHEN = "lora___lorahyphen___", "___lorahyphen___"


def raw_adapter(path) -> dict[str, tuple[torch.Tensor, list[torch.Tensor], float]]:
    """A native adapter file read by hand: module -> (down, ups, alpha_scale)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        name, _, rest = key.partition(".")
        groups.setdefault(name[len(PREFIX):].replace(HYPHEN, "."), {})[rest] = t
    out = {}
    for module, p in groups.items():
        n = sum(k.startswith("lora_up.blocks.") for k in p)
        ups = [p[f"lora_up.blocks.{j}.weight"] for j in range(n)] if n else [p["lora_up.weight"]]
        out[module] = (p["lora_down.weight"], ups, float(p["alpha_scale"]))
    return out


def update(down, ups, alpha, mult, exact: bool) -> torch.Tensor:
    """``mult * alpha * blockdiag(ups) @ down`` in fp32: per block (the same matmuls the merge
    runs, so equal bit for bit) or through one block-diagonal matrix (equal to rounding)."""
    if exact:
        r = down.shape[0] // len(ups)
        prod = torch.cat([u.float() @ down[j * r:(j + 1) * r].float()
                          for j, u in enumerate(ups)])
    else:
        prod = torch.block_diag(*[u.float() for u in ups]) @ down.float()
    return prod * (mult * alpha)


def expected(weights, adapters, dtype, exact: bool) -> dict[str, torch.Tensor]:
    """Per adapted weight: ``(W.float() + update_1 + update_2 ...).to(dtype)``."""
    acc: dict[str, torch.Tensor] = {}
    for raw, mult in adapters:
        for module, (down, ups, alpha) in raw.items():
            key = f"{module}.weight"
            w = acc.setdefault(key, weights[key].to(dtype).float().clone())
            w += update(down, ups, alpha, mult, exact).view(w.shape)
    return {k: v.to(dtype) for k, v in acc.items()}


def forward(dit):
    with torch.no_grad():
        return dit(**probe_inputs(dit))


@pytest.fixture
def reads(monkeypatch):
    """Every ``fill_parameters`` call after the fixture starts: the parameter names it read."""
    calls: list[list[str] | None] = []
    real = loading.fill_parameters

    def counted(model, ckpt, names=None, progress=None):
        calls.append(None if names is None else sorted(names))
        return real(model, ckpt, names, progress)
    monkeypatch.setattr(loading, "fill_parameters", counted)
    return calls


def test_merged_forward_equals_runtime_and_the_fp32_sum(tiny_native):
    raw_cfg, raw_ref = raw_adapter(tiny_native / CFG), raw_adapter(tiny_native / REF)
    assert any(len(ups) > 1 for _, ups, _ in raw_cfg.values())  # block-diagonal ups covered
    dit = load_transformer(tiny_native)
    dit.load_lora(tiny_native / CFG, "cfg", scale=0.5)
    dit.load_lora(tiny_native / REF, "ref")
    plain = forward(dit)
    dit.lora_mode = "runtime"
    dit.enable_loras(["cfg", "ref"])
    runtime = forward(dit)
    assert dit.merged_loras == []
    dit.lora_mode = "merge"  # the set in effect is merged at once
    assert dit.merged_loras == ["cfg", "ref"] and dit.active_loras == ["cfg", "ref"]
    assert all(m.loras == [] for m in dit.modules() if hasattr(m, "loras"))
    merged = forward(dit)
    assert (merged - plain).abs().max() > 1e-3
    torch.testing.assert_close(merged, runtime, rtol=1e-5, atol=1e-5)
    want = expected(native_state(tiny_native), [(raw_cfg, 0.5), (raw_ref, 1.0)], torch.float32,
                    exact=False)
    state = dit.state_dict()
    for key, w in want.items():
        torch.testing.assert_close(state[key], w, rtol=1e-6, atol=1e-6)


def test_bf16_merge_rounds_once(tiny_native):
    raw = raw_adapter(tiny_native / CFG)
    dit = load_transformer(tiny_native, dtype=torch.bfloat16)
    dit.load_lora(tiny_native / CFG, "cfg", scale=1.5)
    dit.enable_loras(["cfg"])
    want = expected(native_state(tiny_native), [(raw, 1.5)], torch.bfloat16, exact=True)
    state = dit.state_dict()
    wrong = [k for k, w in want.items() if not torch.equal(state[k], w)]
    assert wrong == []
    # the update survives the rounding (it is not lost below bf16's resolution)
    base = native_state(tiny_native)
    assert sum(not torch.equal(state[k], base[k].to(torch.bfloat16)) for k in want) == len(want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_from_the_checkpoint_is_exact_and_reads_only_merged_weights(tiny_native, reads,
                                                                            dtype):
    dit = load_transformer(tiny_native, dtype=dtype)
    reads.clear()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    dit.load_lora(tiny_native / REF, "ref", scale=0.7)
    dit.enable_loras(["ref"])
    assert reads == []  # nothing kept, nothing read to merge
    assert not all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())
    dit.disable_loras()
    assert dit.merged_loras == [] and dit.active_loras == []
    assert reads == [sorted(f"{m}.weight" for m in raw_adapter(tiny_native / REF))]
    after = dit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_restore_from_a_split_layout_reads_every_part(tiny_native, tmp_path, reads):
    """FastVideo keys split qkv and kv_linear into several tensors: all are read back."""
    root = make_layout(tiny_native, tmp_path / "conv", "converted")
    dit = load_transformer(root)
    reads.clear()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    dit.load_lora(tiny_native / CFG, "cfg")
    dit.enable_loras(["cfg"])
    assert "blocks.0.attn.qkv" in dit.lora_registry["cfg"]
    dit.disable_loras()
    assert len(reads) == 1
    after = dit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_checkpoint_changed_on_disk_is_not_read_back(tiny_native, tmp_path):
    root = tmp_path / "ck"
    shutil.copytree(tiny_native, root)
    dit = load_transformer(root)
    dit.load_lora(tiny_native / CFG, "cfg")
    shard = next((root / "dit").glob("*.safetensors"))
    os.utime(shard, ns=(0, 0))  # changed before the merge: a host copy is kept instead
    dit.enable_loras(["cfg"])
    assert dit._lora_merged.originals
    dit.disable_loras()
    dit = load_transformer(root)
    dit.load_lora(tiny_native / CFG, "cfg")
    dit.enable_loras(["cfg"])  # changed after the merge: refused, not restored wrongly
    os.utime(shard, ns=(1, 1))
    with pytest.raises(LongcatError, match="changed on disk since the model was loaded"):
        dit.disable_loras()
    assert dit.merged_loras == ["cfg"]  # still said: saving stays refused
    with pytest.raises(LongcatError, match="merged into the weights"):
        dit.save_pretrained(tmp_path / "x")


def test_restore_from_a_host_copy_when_there_is_no_checkpoint(tiny_native, tmp_path, reads):
    load_transformer(tiny_native).save_pretrained(tmp_path / "saved")
    dit = LongCatTransformer3DModel.from_pretrained(tmp_path / "saved")
    assert getattr(dit, "origin", None) is None
    reads.clear()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    plain = forward(dit)
    dit.load_lora(tiny_native / CFG, "cfg")
    dit.enable_loras(["cfg"])
    assert not torch.equal(forward(dit), plain)
    dit.disable_loras()
    assert reads == []
    after = dit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(forward(dit), plain)


def test_weights_edited_after_loading_are_kept_not_read_back(tiny_native, reads):
    """``load_state_dict`` makes the weights no longer the checkpoint's: a host copy is kept."""
    dit = load_transformer(tiny_native)
    sd = {k: v + 1 for k, v in dit.state_dict().items()}
    dit.load_state_dict(sd)
    reads.clear()
    dit.load_lora(tiny_native / CFG, "cfg")
    dit.enable_loras(["cfg"])
    dit.disable_loras()
    assert reads == []
    after = dit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in sd.items())


def test_a_weight_edited_in_place_is_kept_not_read_back(tiny_native, reads):
    """A training step (an in-place edit) on a loaded model: restore read the shards, so the
    merged weights came back as the checkpoint's and the edit was lost."""
    dit = load_transformer(tiny_native)
    dit.load_lora(tiny_native / CFG, "cfg")
    reads.clear()
    for _ in range(2):  # merged and read back from the shards: still the checkpoint's after
        dit.enable_loras(["cfg"])
        dit.disable_loras()
    assert len(reads) == 2
    w = dit.blocks[0].attn.qkv.weight
    with torch.no_grad():
        w.mul_(2.0)
    sd = {k: v.clone() for k, v in dit.state_dict().items()}
    reads.clear()
    dit.enable_loras(["cfg"])
    assert dit._lora_merged.originals
    dit.disable_loras()
    assert reads == []
    after = dit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in sd.items())


def test_a_new_set_or_scale_restores_then_merges_and_the_same_set_is_free(tiny_native, reads,
                                                                           monkeypatch):
    merges = []
    real = lora_merge.merge_into
    monkeypatch.setattr(lora_merge, "merge_into",
                        lambda w, d, s=None: (merges.append(1), real(w, d, s)))
    raw_cfg, raw_ref = raw_adapter(tiny_native / CFG), raw_adapter(tiny_native / REF)
    base = native_state(tiny_native)
    dit = load_transformer(tiny_native)
    reads.clear()
    dit.load_lora(tiny_native / CFG, "cfg")
    dit.load_lora(tiny_native / REF, "ref")

    dit.enable_loras(["cfg"])
    n = len(merges)
    assert n == len(raw_cfg)
    dit.enable_loras(["cfg"])  # same set, same scale: a no-op
    assert len(merges) == n and reads == []

    dit.enable_loras(["ref"])  # another set: cfg comes out first, ref goes into the originals
    assert len(reads) == 1 and len(reads[0]) == len(raw_cfg)
    state = dit.state_dict()
    for key, w in expected(base, [(raw_ref, 1.0)], torch.float32, exact=True).items():
        assert torch.equal(state[key], w), key
    cfg_only = {f"{m}.weight" for m in raw_cfg} - {f"{m}.weight" for m in raw_ref}
    assert all(torch.equal(state[k], base[k]) for k in cfg_only)

    for d in dit.lora_registry["ref"].values():  # a scale change is a new set
        d.multiplier = 0.25
    dit.enable_loras(["ref"])
    assert len(reads) == 2
    state = dit.state_dict()
    for key, w in expected(base, [(raw_ref, 0.25)], torch.float32, exact=True).items():
        assert torch.equal(state[key], w), key

    dit.load_lora(tiny_native / REF, "ref")  # reloaded under the same name: a new set too
    dit.enable_loras(["ref"])
    assert len(reads) == 3


def test_conv3d_and_linear_targets_of_a_peft_file(tiny_native, tmp_path):
    """The patch embedding (a Conv3d) takes its delta as its weight viewed [out, -1]."""
    dit = load_transformer(tiny_native)
    conv, w1 = dit.x_embedder.proj.weight, dit.blocks[0].ffn.w1.weight
    r, alpha = 4, 8
    g = torch.Generator().manual_seed(3)
    a_conv = torch.randn(r, *conv.shape[1:], generator=g) * 0.1
    b_conv = torch.randn(conv.shape[0], r, 1, 1, 1, generator=g) * 0.1
    a_w1 = torch.randn(r, w1.shape[1], generator=g) * 0.1
    b_w1 = torch.randn(w1.shape[0], r, generator=g) * 0.1
    path = tmp_path / "pytorch_lora_weights.safetensors"
    meta = {"transformer.r": r, "transformer.lora_alpha": alpha,
            "transformer.target_modules": ["x_embedder.proj", "w1"],
            "transformer.peft_type": "LORA"}
    save_file({"transformer.x_embedder.proj.lora_A.weight": a_conv,
               "transformer.x_embedder.proj.lora_B.weight": b_conv,
               "transformer.blocks.0.ffn.w1.lora_A.weight": a_w1,
               "transformer.blocks.0.ffn.w1.lora_B.weight": b_w1}, str(path),
              {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    dit.load_lora(path, "st", scale=0.5)
    dit.lora_mode = "runtime"
    dit.enable_loras(["st"])
    runtime = forward(dit)
    dit.lora_mode = "merge"
    merged = forward(dit)
    torch.testing.assert_close(merged, runtime, rtol=1e-5, atol=1e-5)
    s = 0.5 * alpha / r
    state = dit.state_dict()
    want_conv = base["x_embedder.proj.weight"] + s * (b_conv.view(-1, r) @ a_conv.view(r, -1)
                                                      ).view(conv.shape)
    want_w1 = base["blocks.0.ffn.w1.weight"] + s * (b_w1 @ a_w1)
    torch.testing.assert_close(state["x_embedder.proj.weight"], want_conv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state["blocks.0.ffn.w1.weight"], want_w1, rtol=1e-6, atol=1e-6)
    dit.disable_loras()
    after = dit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_a_set_that_cannot_be_merged_runs_at_run_time(tiny_native):
    """diffusers' layerwise casting stores the weights in another dtype: no merge there."""
    dit = load_transformer(tiny_native)
    dit.load_lora(tiny_native / CFG, "cfg")
    dit.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    dit.enable_loras(["cfg"])
    assert dit.active_loras == ["cfg"] and dit.merged_loras == []
    assert any(m.loras for m in dit.modules() if hasattr(m, "loras"))


def test_bad_mode_and_save_pretrained_while_merged_are_refused(tiny_native, tmp_path):
    dit = load_transformer(tiny_native)
    with pytest.raises(LongcatError, match="lora_mode 'fused': unknown"):
        dit.lora_mode = "fused"
    dit.load_lora(tiny_native / CFG, "cfg")
    dit.enable_loras(["cfg"])
    with pytest.raises(LongcatError, match="cfg is merged into the weights; call disable_loras"):
        dit.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_pipeline_merge_equals_runtime_and_leaves_the_checkpoint_weights(tiny_native, tmp_path):
    root = tmp_path / "ck"
    shutil.copytree(tiny_native, root)
    pipe = LongCatVideoPipeline.from_pretrained(root)
    dit = pipe.transformer
    kw = dict(prompt="a cat", height=32, width=32, num_frames=9, steps=2, distill=True, seed=3,
              decode=False)
    dit.lora_mode = "runtime"
    runtime = pipe.t2v(**kw)
    assert runtime.info["loras"] == ["distilled"] and runtime.info["merged_loras"] == []
    dit.lora_mode = "merge"
    merged = pipe.t2v(**kw)
    assert merged.info["loras"] == ["distilled"] and merged.info["merged_loras"] == ["distilled"]
    torch.testing.assert_close(merged.latents, runtime.latents, rtol=1e-4, atol=1e-4)
    # the call's set stays in the weights (lazily given back), but every use sees the caller's
    assert dit.active_loras == [] and dit.merged_loras == ["distilled"]
    base = native_state(root)
    state = dit.state_dict()  # restores first
    assert dit.merged_loras == []
    assert all(torch.equal(state[k], v) for k, v in base.items())
    # the same call again merges again and gives the same latents; a plain call restores
    assert torch.equal(pipe.t2v(**kw).latents, merged.latents)
    plain = pipe.t2v(**{**kw, "distill": False, "steps": 1})
    assert plain.info["merged_loras"] == [] and dit.merged_loras == []
    dit.save_pretrained(tmp_path / "saved")  # after a lazy give-back: the plain weights
    saved = load_file(str(next((tmp_path / "saved").glob("*.safetensors"))))
    assert all(torch.equal(saved[k], v) for k, v in base.items())


def test_run_records_the_mode_and_refuses_a_bad_one(capsys, tiny_native, tmp_path):
    from longcat_tools.cli import main

    tiny = ["-m", str(tiny_native), "-p", "a cat", "--height", "32", "--width", "32",
            "--frames", "9", "--steps", "1", "--distill", "-q"]
    refused(capsys, "run", *tiny, "--lora-mode", "bogus", code=2,
            says="--lora-mode bogus: unknown (use merge or runtime)")
    frames = {}
    for mode in ("merge", "runtime"):
        out = tmp_path / f"{mode}.mp4"
        assert main(["run", *tiny, "--lora-mode", mode, "--out", str(out),
                     "--save-latents", str(tmp_path / f"{mode}.safetensors")]) == 0
        doc = json.loads(out.with_name(out.name + ".json").read_text())
        assert doc["settings"]["lora_mode"] == mode and doc["loras"] == ["distilled"]
        assert doc["final"]["merged_loras"] == (["distilled"] if mode == "merge" else [])
        frames[mode] = load_file(str(tmp_path / f"{mode}.safetensors"))["latents"].numpy()
    np.testing.assert_allclose(frames["merge"], frames["runtime"], rtol=1e-4, atol=1e-4)


def test_a_model_loaded_under_inference_mode_merges_and_restores(tiny_native, reads):
    """Its tensors were inference tensors: recording their versions raised "Inference tensors
    do not track version counter", and a merge outside inference mode could not edit them."""
    with torch.inference_mode():
        dit = load_transformer(tiny_native)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    dit.load_lora(tiny_native / CFG, "cfg")
    reads.clear()
    dit.enable_loras(["cfg"])
    dit.disable_loras()
    assert len(reads) == 1  # read back from the shards, as any loaded model
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in before.items())
