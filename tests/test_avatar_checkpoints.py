"""verify, bsa, lora and convert on LongCat-Video-Avatar folders (1.0 and 1.5, tiny synth trees).

Tensor names, faults and expected values are written out here (or computed here from the stored
tensors), not taken from longcat_tools.model.avatar or the LoRA format code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_tools import schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.model import avatar
from longcat_tools.verify import verify

pytest.importorskip("onnx")


def _failed(report) -> list:
    return [c for c in report.checks if c.status == "fail"]


def _shard_of(folder: Path, index: str, tensor: str) -> Path:
    return folder / json.loads((folder / index).read_text())["weight_map"][tensor]


def _edit(path: Path, change) -> None:
    """Rewrite one safetensors file with ``change(dict)`` applied to its tensors."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --- detection ---------------------------------------------------------------------------------

def test_detect_any_describes_both_releases(avatar_trees):
    v10 = layouts.detect_any(avatar_trees["avatar-1.0"] / avatar.VERSIONS["avatar-1.0"].folder)
    v15 = layouts.detect_any(avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder)
    assert isinstance(v10, layouts.AvatarCheckpoint) and v10.layout == "avatar-1.0"
    assert v10.dit_folders == ("avatar_single", "avatar_multi") and v10.int8 is None
    assert v10.audio_encoder.name == "chinese-wav2vec2-base"
    assert v10.base_parts == ("tokenizer", "text_encoder", "vae", "scheduler")
    assert v15.dit_folders == ("base_model", "base_model_int8") and v15.int8 == "base_model_int8"
    assert v15.base_parts == ("tokenizer", "text_encoder", "vae")
    assert v15.require_base() == avatar_trees["avatar-1.5"] / "LongCat-Video"
    # base checkpoints keep their Checkpoint; detect() names an avatar folder and refuses it
    base = layouts.detect(avatar_trees["avatar-1.5"] / "LongCat-Video")
    assert base.layout == "native" and base.avatar is None
    with pytest.raises(Exception, match="LongCat-Video-Avatar 1.5 checkpoint"):
        layouts.detect(avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder)


def test_missing_base_is_one_line_saying_where(avatar_copy):
    av = avatar_copy("avatar-1.5")
    shutil.rmtree(av.parent / "LongCat-Video")
    ck = layouts.detect_any(av)
    with pytest.raises(Exception) as e:
        ck.require_base()
    msg = str(e.value)
    assert "\n" not in msg and str(av.parent / "LongCat-Video") in msg and "beside" in msg


def test_the_content_stamp_covers_the_base_parts_an_avatar_reads(avatar_copy):
    """A resumed matrix run compares it: a new VAE in ../LongCat-Video must remake the videos,
    while the base's own DiT, which the avatar never reads, must not."""
    import os

    av = avatar_copy("avatar-1.0")
    base = av.parent / "LongCat-Video"
    before = layouts.content_stamp(av)
    for part, changes in (("dit", False), ("vae", True)):
        f = next(p for p in sorted((base / part).iterdir()) if p.is_file())
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
        after = layouts.content_stamp(av)
        assert (after != before) is changes, part
        before = after


# --- verify ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(avatar.VERSIONS))
@pytest.mark.parametrize("deep", [False, True])
def test_verify_passes_tiny_trees(avatar_trees, model, deep):
    report = verify(avatar_trees[model] / avatar.VERSIONS[model].folder, deep=deep)
    assert _failed(report) == [] and report.count("warn") == 0, report.checks
    assert report.layout == model and report.flavour == "native"
    files = {c.file for c in report.checks}
    if model == "avatar-1.5":
        assert {"base_model_int8", "lora/dmd_lora.safetensors",
                "whisper-large-v3/model.safetensors", "vocal_separator/Kim_Vocal_2.onnx",
                "../LongCat-Video/text_encoder/config.json"} <= files
        scales = next(c for c in report.checks if c.name == "scales")
        assert scales.status == "pass" and scales.component == "base_model_int8"
    else:
        pickle = next(c for c in report.checks if c.file.endswith("pytorch_model.bin"))
        assert pickle.status == "pass" and "never unpickled" in pickle.message
        assert "../LongCat-Video/scheduler/scheduler_config.json" in files
    if deep:
        assert any(c.name == "deep" and c.component == (
            "base_model" if model == "avatar-1.5" else "avatar_multi") for c in report.checks)


def test_verify_json_and_exit_codes(avatar_trees, avatar_copy, capsys):
    av = avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder
    assert main(["verify", str(av), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert schemas.errors(doc, "verify_report") == [] and doc["layout"] == "avatar-1.5"
    bad = avatar_copy("avatar-1.0")
    (bad / "vocal_separator" / "Kim_Vocal_2.onnx").unlink()
    assert main(["verify", str(bad), "-q"]) == 1


def test_verify_forward_on_an_avatar_is_a_usage_error(avatar_trees, capsys):
    """It ran the base model's probe and failed a sound checkpoint, exit 1, with a message
    saying verify handles avatars."""
    av = avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder
    assert main(["verify", str(av), "--forward", "-q"]) == 2
    assert "--forward probes the base model's DiT" in capsys.readouterr().err


def test_verify_names_every_injected_fault(avatar_copy):
    av = avatar_copy("avatar-1.5")
    shutil.rmtree(av.parent / "LongCat-Video")  # missing sibling base
    (av / "vocal_separator" / "Kim_Vocal_2.onnx").unlink()  # missing onnx
    dit, q = av / "base_model", av / "base_model_int8"
    dit_index, q_index = "diffusion_pytorch_model.safetensors.index.json", \
        "quantized_model.safetensors.index.json"
    gone = "blocks.1.audio_cross_attn.kv_linear.weight"
    shard = _shard_of(dit, dit_index, gone)
    _edit(shard, lambda t: t.pop(gone))
    index = json.loads((dit / dit_index).read_text())
    del index["weight_map"][gone]
    (dit / dit_index).write_text(json.dumps(index))
    narrow = "audio_proj.proj1.weight"  # [32, 5*5*32]: one input column short
    _edit(_shard_of(dit, dit_index, narrow),
          lambda t: t.update({narrow: t[narrow][:, :-1].contiguous()}))
    zero, nan = "blocks.0.attn.qkv.weight_scale", "blocks.1.ffn.w2.weight_scale"
    _edit(_shard_of(q, q_index, zero), lambda t: t[zero].__setitem__(3, 0.0))
    _edit(_shard_of(q, q_index, nan), lambda t: t[nan].__setitem__(0, float("nan")))
    u8 = "blocks.0.ffn.w1.weight_int8"
    _edit(_shard_of(q, q_index, u8), lambda t: t.update({u8: t[u8].view(torch.uint8)}))

    fails = _failed(verify(av))
    text = "\n".join(f"{c.component} {c.name} {c.file}: {c.message}" for c in fails)

    def named(component: str, check: str, *words: str) -> bool:
        return any(c.component == component and c.name == check
                   and all(w in c.message or w in c.file for w in words) for c in fails)

    assert named("checkpoint", "base", "LongCat-Video", "missing", "beside"), text
    assert named("vocal_separator", "files", "Kim_Vocal_2.onnx", "missing"), text
    assert named("base_model", "tensors", gone), text
    assert named("base_model", "shapes", narrow, "[32, 799]", "[32, 800]"), text
    assert named("base_model_int8", "scales", zero, "0.0"), text
    assert named("base_model_int8", "scales", nan, "nan"), text
    assert named("base_model_int8", "dtype", u8, "U8"), text


def test_verify_warns_of_mixed_dtypes_in_the_int8_folder_as_in_the_others(avatar_copy):
    av = avatar_copy("avatar-1.5")
    q, index = av / "base_model_int8", "quantized_model.safetensors.index.json"
    norm = "blocks.0.attn.q_norm.weight"
    _edit(_shard_of(q, index, norm), lambda t: t.update({norm: t[norm].half()}))
    report = verify(av, strict=True)
    (row,) = [c for c in report.checks if c.component == "base_model_int8" and c.name == "dtype"]
    assert row.status == "warn" and "the unquantized tensors mix ['F16', 'F32']" in row.message
    assert not report.ok


def test_verify_int8_quantization_method(avatar_copy):
    av = avatar_copy("avatar-1.5")
    path = av / "base_model_int8" / "quantization_config.json"
    path.write_text(json.dumps({"quantization_method": "fp8_e4m3"}))
    fails = _failed(verify(av))
    assert any(c.name == "quantization" and "int8_per_channel_symmetric" in c.message
               for c in fails)


# --- bsa ---------------------------------------------------------------------------------------

def test_bsa_preset_round_trip_on_every_dit_config(avatar_copy, capsys):
    av = avatar_copy("avatar-1.5")
    configs = [av / "base_model" / "config.json", av / "base_model_int8" / "config.json"]
    before = [p.read_bytes() for p in configs]
    assert main(["bsa", "preset", "720p-balanced", "-m", str(av), "-q"]) == 0
    for p in configs:
        cfg = json.loads(p.read_text())
        assert cfg["enable_bsa"] is True
        assert cfg["bsa_params"]["sparsity"] == 0.9375
        assert cfg["bsa_params"]["chunk_3d_shape_q"] == [4, 4, 4]
        assert cfg["_class_name"] == "LongCatVideoAvatarTransformer3DModel"
    assert _failed(verify(av)) == []
    capsys.readouterr()
    assert main(["bsa", "status", "-m", str(av), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["preset"] for c in doc["configs"]] == ["720p-balanced", "720p-balanced"]
    assert main(["bsa", "restore", "-m", str(av), "-q"]) == 0
    assert [p.read_bytes() for p in configs] == before


def test_bsa_refuses_before_writing_any_config(avatar_copy):
    av = avatar_copy("avatar-1.0")
    single, multi = av / "avatar_single" / "config.json", av / "avatar_multi" / "config.json"
    before = single.read_bytes()
    cfg = json.loads(multi.read_text())
    cfg["depth"] = "two"  # a change to this config fails its schema: nothing may be written
    multi.write_text(json.dumps(cfg))
    assert main(["bsa", "enable", "-m", str(av), "-q"]) == 1
    assert single.read_bytes() == before and not (single.parent / "config.json.bak").exists()


def test_bsa_restore_swaps_no_config_while_one_is_read_only(avatar_copy, capsys):
    """restore swapped base_model/ and then stopped at the read-only base_model_int8/: the two
    out of step, and the next restore (after chmod) swapped each back, still out of step."""
    av = avatar_copy("avatar-1.5")
    assert main(["bsa", "preset", "720p-fast", "-m", str(av), "-q"]) == 0
    configs = [av / d / "config.json" for d in ("base_model", "base_model_int8")]
    before = [c.read_bytes() for c in configs]
    configs[1].chmod(0o444)
    try:
        assert main(["bsa", "restore", "-m", str(av), "-q"]) == 1
        assert "read-only" in capsys.readouterr().err
        assert [c.read_bytes() for c in configs] == before
    finally:
        configs[1].chmod(0o644)
    assert main(["bsa", "restore", "-m", str(av), "-q"]) == 0
    assert [json.loads(c.read_text())["enable_bsa"] for c in configs] == [False, False]


# --- lora --------------------------------------------------------------------------------------

NATIVE = "lora___lorahyphen___"


def _native_deltas(path: Path) -> dict[str, torch.Tensor]:
    """module -> alpha_scale * blockdiag(ups) @ down, from a native file's tensors."""
    t = load_file(path)
    out = {}
    for key in t:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        down = t[key].double()
        ups = ([t[stem + ".lora_up.weight"]] if stem + ".lora_up.weight" in t else
               [t[f"{stem}.lora_up.blocks.{j}.weight"] for j in range(64)
                if f"{stem}.lora_up.blocks.{j}.weight" in t])
        r = down.shape[0] // len(ups)
        delta = torch.cat([u.double() @ down[j * r:(j + 1) * r] for j, u in enumerate(ups)])
        module = stem[len(NATIVE):].replace("___lorahyphen___", ".")
        out[module] = delta * float(t[stem + ".alpha_scale"].double())
    return out


def _peft_deltas(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """module -> lora_alpha / r * B @ A, by PEFT's rules (patterns by full name)."""
    t = load_file(path)
    out = {}
    for key in t:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("transformer."): -len(".lora_A.weight")]
        r = config["rank_pattern"].get(module, config["r"])
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        b = t[key.replace("lora_A", "lora_B")].double()
        out[module] = b @ t[key].double() * (alpha / r)
    return out


def test_lora_list_and_peft_export_of_dmd(avatar_copy, tmp_path, capsys):
    av = avatar_copy("avatar-1.5")
    assert main(["lora", "list", "-m", str(av), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (item,) = doc["adapters"]
    assert (item["name"], item["file"], item["status"]) == ("dmd_lora", "dmd_lora.safetensors",
                                                            "ok")
    assert doc["layout"] == "avatar-1.5"
    out = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    out.parent.mkdir()
    assert main(["lora", "export", "dmd_lora", "--format", "peft", "--out", str(out),
                 "-m", str(av), "-q"]) == 0
    want = _native_deltas(av / "lora" / "dmd_lora.safetensors")
    got = _peft_deltas(out, json.loads((out.parent / "adapter_config.json").read_text()))
    assert set(got) == set(want) and len(want) == 14
    for m in want:
        assert torch.allclose(got[m], want[m], rtol=0, atol=1e-12), m


def _avatar_lora(path: Path, kv_in: int, proj1_in: int) -> None:
    """A native LoRA on two avatar-only modules (rank 2, alpha_scale 0.5)."""
    g = torch.Generator().manual_seed(1)
    t = {}
    for module, (out_f, in_f) in {"blocks.0.audio_cross_attn.kv_linear": (128, kv_in),
                                  "audio_proj.proj1": (32, proj1_in)}.items():
        stem = NATIVE + module.replace(".", "___lorahyphen___")
        t[stem + ".lora_down.weight"] = torch.randn(2, in_f, generator=g)
        t[stem + ".lora_up.weight"] = torch.randn(out_f, 2, generator=g)
        t[stem + ".alpha_scale"] = torch.tensor(0.5)
    save_file(t, path)


def test_lora_on_avatar_modules(avatar_copy, tmp_path, capsys):
    av = avatar_copy("avatar-1.5")
    src = tmp_path / "audio.safetensors"
    _avatar_lora(src, kv_in=32, proj1_in=5 * 5 * 32)  # tiny: output_dim 32, 5 x 5 x 32 audio
    assert main(["lora", "attach", str(src), "--name", "audio", "-m", str(av), "-q"]) == 0
    assert _failed(verify(av)) == []
    out = tmp_path / "audio_peft.safetensors"
    assert main(["lora", "export", "audio", "--format", "peft", "--out", str(out),
                 "-m", str(av), "-q"]) == 0
    got = _peft_deltas(out, json.loads((tmp_path / "adapter_config.json").read_text()))
    want = _native_deltas(src)
    assert set(got) == {"blocks.0.audio_cross_attn.kv_linear", "audio_proj.proj1"}
    for m in want:
        assert torch.allclose(got[m], want[m], rtol=0, atol=1e-12)
    capsys.readouterr()
    for fmt in ("fastvideo", "comfy"):
        dst = tmp_path / f"audio_{fmt}.safetensors"
        assert main(["lora", "export", "audio", "--format", fmt, "--out", str(dst),
                     "-m", str(av)]) == 1
        err = capsys.readouterr().err.strip()
        assert "avatar DiT" in err and "--format native or peft" in err and "\n" not in err
        assert not dst.exists()
    assert main(["lora", "detach", "audio", "-m", str(av), "-q"]) == 0
    assert not (av / "lora" / "audio").exists()
    # the base model has no audio modules: the same file is refused there
    base = av.parent / "LongCat-Video"
    assert main(["lora", "attach", str(src), "--name", "audio", "-m", str(base)]) == 1
    assert "avatar DiT" in capsys.readouterr().err


def test_lora_refuses_misfit_on_avatar(avatar_copy, tmp_path, capsys):
    av = avatar_copy("avatar-1.0")
    src = tmp_path / "wrong.safetensors"
    _avatar_lora(src, kv_in=32, proj1_in=5 * 5 * 32)  # 1.0 has 12 audio blocks: 5*12*32 inputs
    assert main(["lora", "attach", str(src), "--name", "x", "-m", str(av)]) == 1
    err = capsys.readouterr().err
    assert "audio_proj.proj1" in err and f"{32}x{5 * 12 * 32}" in err
    assert not (av / "lora" / "x").exists()


def test_a_weights_tree_is_named_with_the_folders_to_pass(avatar_trees):
    """`-m` on the tree synth writes said only 'not a LongCat-Video checkpoint'."""
    with pytest.raises(LongcatError, match=r"it holds LongCat-Video/, LongCat-Video-Avatar-1.5/: "
                                           "pass one of those"):
        layouts.detect_any(avatar_trees["avatar-1.5"])
