"""``lora``: attach / list / detach / export / fuse on real layouts, exact and all-or-nothing."""

import hashlib
import json
import logging
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_tools import lora as lora_lib
from longcat_tools import schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import read_header, read_tensor, write_json
from longcat_tools.lora import formats as lf
from longcat_tools.model import keymap

HUB = {"distilled": "cfg_step_lora.safetensors", "refinement": "refinement_lora.safetensors"}


@pytest.fixture
def native(tiny_native, tmp_path):
    dst = tmp_path / "native"
    shutil.copytree(tiny_native, dst)
    return dst


def _fastvideo_checkpoint(native_root, dst):
    """FastVideo's converter layout (transformer/model.safetensors, FastVideo keys) with the hub
    adapters in lora/<name>/ in FastVideo format: what ``convert`` and FastVideo produce."""
    shutil.copytree(native_root, dst, ignore=shutil.ignore_patterns("dit", "lora"))
    cfg = json.loads((native_root / "dit" / "config.json").read_text())
    cfg["_class_name"] = keymap.FASTVIDEO_CLASS
    cfg["num_attention_heads"] = cfg.pop("num_heads")
    (dst / "transformer").mkdir()
    write_json(dst / "transformer" / "config.json", cfg)
    tensors = {}
    for name, path in layouts.transformer_shards(layouts.detect(native_root)).items():
        with open(path, "rb") as f:
            w = read_tensor(f, read_header(path).tensors[name])
        for part in keymap.native_to_fastvideo(name):
            tensors[part.fastvideo] = w.chunk(part.count, 0)[part.index].clone()
    save_file(tensors, str(dst / "transformer" / "model.safetensors"))
    shapes = lf.linear_shapes(keymap.dit_dims(cfg))
    for name, fname in HUB.items():
        (dst / "lora" / name).mkdir(parents=True)
        lf.write_lora(dst / "lora" / name / fname,
                      lf.read_lora(native_root / "lora" / fname, shapes), "fastvideo")
    return dst


@pytest.fixture
def fastvideo(tiny_native, tmp_path):
    return _fastvideo_checkpoint(tiny_native, tmp_path / "fastvideo")


def _same_tensors(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y), sorted(set(x) ^ set(y))[:4]
    return [k for k in x if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]


def _tree(root):
    """Every path under ``root`` with its size and mtime: proof that nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file()
            else "dir" for p in sorted(root.rglob("*"))}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(capsys, *args):
    rc = main(["lora", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_shows_the_hub_adapters_without_writing(native, capsys):
    before = _tree(native)
    rc, out, _ = _cli(capsys, "list", "-m", native, "--json")
    assert rc == 0
    doc = json.loads(out)
    got = {a["name"]: a for a in doc["adapters"]}
    assert set(got) == set(HUB)
    for name, fname in HUB.items():
        a = got[name]
        assert (a["file"], a["format"], a["rank"], a["alpha"], a["status"], a["registered"]) == (
            fname, "native", 4, 2.0, "ok", False)
    assert got["refinement"]["modules"] == 2 * 8 + 2 and got["distilled"]["modules"] == 2 * 7
    assert _tree(native) == before


@pytest.mark.parametrize("stem", ["x,y", "a:b", " pad"])
def test_list_names_a_file_that_run_lora_cannot_name(native, capsys, stem):
    """A file dropped into lora/ under a name holding ',' or ':' (or spaces at its ends) was
    listed as ok, yet `run --lora` and `lora fuse` split the name and could not find it."""
    shutil.copy(native / "lora" / HUB["distilled"], native / "lora" / f"{stem}.safetensors")
    rc, out, err = _cli(capsys, "list", "-m", native, "--json")
    got = {a["name"]: a["status"] for a in json.loads(out)["adapters"]}
    assert rc == 1 and got[stem].startswith("its name cannot be given to --lora"), got
    assert {got[n] for n in HUB} == {"ok"}
    assert "rename the file" in err.splitlines()[-1]


def test_detach_never_deletes_another_adapters_file(native, tmp_path, capsys):
    """An edited adapters.json whose entry names another adapter's file: detach deleted that
    adapter's folder (``removed lora/p1``) and exited 0."""
    peft = tmp_path / "e_peft.safetensors"
    assert _cli(capsys, "export", "distilled", "-m", native, "--format", "peft", "--out",
                peft)[0] == 0
    for name in ("style", "p1"):
        assert _cli(capsys, "attach", peft, "--name", name, "-m", native)[0] == 0
    reg_path = native / "lora" / "adapters.json"
    reg = json.loads(reg_path.read_text())
    p1_file = next(a["file"] for a in reg["adapters"] if a["name"] == "p1")
    for a in reg["adapters"]:
        if a["name"] == "style":
            a["file"] = p1_file
    reg_path.write_text(json.dumps(reg))
    before = _tree(native)
    rc, _, err = _cli(capsys, "detach", "style", "-m", native)
    assert rc == 1 and "also holds adapter 'p1'" in err and "nothing deleted" in err, err
    assert _tree(native) == before
    assert main(["verify", str(native), "-q"]) == 1  # it passed this registry
    assert f"{p1_file} is named by 2 adapters" in capsys.readouterr().err


def test_a_killed_detach_leaves_nothing_that_is_carried_on(native, tmp_path, capsys):
    """Killed before it deleted its trash, detach left lora/.style.detached-PID/ for good:
    convert copied it into new checkpoints, listed in their checksums."""
    peft = tmp_path / "e_peft.safetensors"
    assert _cli(capsys, "export", "distilled", "-m", native, "--format", "peft", "--out",
                peft)[0] == 0
    assert _cli(capsys, "attach", peft, "--name", "style", "-m", native)[0] == 0
    lora = native / "lora"
    trash = lora / ".style.detached-99999"
    (lora / "style").rename(trash)  # where a kill after the registry's save leaves it
    (lora / ".adapters.json.abc.tmp").write_text("{")
    assert main(["convert", "--src", str(native), "--dst", str(tmp_path / "c"), "-q"]) == 0
    assert not list((tmp_path / "c" / "lora").glob(".*detached*"))
    assert ".detached-" not in (tmp_path / "c" / "checksums.sha256").read_text()
    assert _cli(capsys, "detach", "style", "-m", native)[0] == 0  # the next lora command
    assert not trash.exists() and not (lora / ".adapters.json.abc.tmp").exists()


def test_verify_applies_the_lora_commands_scale_rule(native, tmp_path, capsys):
    """A hand-edited default_scale of 1e9: every lora command refused the registry, verify
    --strict passed it."""
    peft = tmp_path / "e_peft.safetensors"
    assert _cli(capsys, "export", "distilled", "-m", native, "--format", "peft", "--out",
                peft)[0] == 0
    assert _cli(capsys, "attach", peft, "--name", "style", "-m", native)[0] == 0
    reg_path = native / "lora" / "adapters.json"
    reg = json.loads(reg_path.read_text())
    next(a for a in reg["adapters"] if a["name"] == "style")["default_scale"] = 1e9
    reg_path.write_text(json.dumps(reg))
    assert _cli(capsys, "list", "-m", native)[0] == 1
    assert main(["verify", str(native), "--strict", "-q"]) == 1
    err = capsys.readouterr().err
    assert "adapter 'style' default_scale" in err and "from -10 to 10" in err, err


def test_attach_peft_export_list_detach(native, tmp_path, capsys):
    """Export the distillation LoRA as PEFT, attach it under a new name: the stored native file
    is the hub's file tensor for tensor; the registry records it (schema-valid) and the hub
    adapters found in place; detach removes exactly it."""
    peft = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    peft.parent.mkdir()
    rc, _, err = _cli(capsys, "export", "distilled", "-m", native, "--format", "peft", "--out",
                      peft)
    assert rc == 0, err
    cfg = json.loads((peft.parent / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 2.0 and "blocks.1.attn.qkv" in cfg[
        "target_modules"] and cfg["rank_pattern"]["blocks.1.attn.qkv"] == 12
    rc, out, err = _cli(capsys, "attach", peft, "--name", "mine", "-m", native, "--scale", "0.75",
                        "--json")
    assert rc == 0, err
    res = json.loads(out)
    stored = native / "lora" / "mine" / peft.name
    assert res["file"] == str(stored) and res["source_format"] == "peft"
    assert _same_tensors(native / "lora" / HUB["distilled"], stored) == []
    reg = json.loads((native / "lora" / "adapters.json").read_text())
    assert schemas.errors(reg, "lora_manifest") == []
    recs = {a["name"]: a for a in reg["adapters"]}
    assert set(recs) == {"distilled", "refinement", "mine"}
    mine = recs["mine"]
    assert (mine["file"], mine["format"], mine["rank"], mine["alpha"], mine["default_scale"]) == (
        "mine/pytorch_lora_weights.safetensors", "native", 4, 2.0, 0.75)
    assert mine["source"] == {"file": str(peft.resolve()), "format": "peft", "sha256": _sha(peft)}
    assert "blocks.*.attn.qkv" in mine["targets"] and len(mine["targets"]) == 7
    assert recs["distilled"]["source"]["sha256"] == _sha(native / "lora" / HUB["distilled"])
    assert oct((native / "lora" / "adapters.json").stat().st_mode & 0o777) != "0o600"
    rc, out, _ = _cli(capsys, "list", "-m", native, "--json")
    listed = {a["name"]: a for a in json.loads(out)["adapters"]}
    assert listed["mine"]["registered"] and listed["mine"]["status"] == "ok"
    assert listed["mine"]["default_scale"] == 0.75

    rc, _, err = _cli(capsys, "attach", peft, "--name", "mine", "-m", native)
    assert rc == 1 and "exists" in err
    rc, _, err = _cli(capsys, "detach", "mine", "-m", native)
    assert rc == 0, err
    assert not (native / "lora" / "mine").exists()
    names = [a["name"] for a in json.loads((native / "lora" / "adapters.json").read_text())[
        "adapters"]]
    assert names == ["distilled", "refinement"]
    rc, _, err = _cli(capsys, "detach", "distilled", "-m", native)
    assert rc == 1 and "--force" in err and (native / "lora" / HUB["distilled"]).is_file()
    rc, _, err = _cli(capsys, "detach", "distilled", "-m", native, "--force")
    assert rc == 0 and not (native / "lora" / HUB["distilled"]).exists()
    assert sorted(p.name for p in (native / "lora").iterdir()) == [
        "adapters.json", HUB["refinement"]]


def test_attach_to_fastvideo_layout_and_export_back(native, fastvideo, tmp_path, capsys):
    """A native hub file attached to a FastVideo-keyed checkpoint is stored in FastVideo's form
    (the same tensors as the FastVideo-format files beside it, which follow FastVideo's
    converter), and ``export --format native`` gives the hub file back bit for bit."""
    rc, _, err = _cli(capsys, "attach", native / "lora" / HUB["refinement"], "--name", "r2",
                      "-m", fastvideo)
    assert rc == 0, err
    stored = fastvideo / "lora" / "r2" / HUB["refinement"]
    assert _same_tensors(fastvideo / "lora" / "refinement" / HUB["refinement"], stored) == []
    t = load_file(str(stored))
    c = 64
    assert t["blocks.0.self_attn.to_v.lora_A"].shape == (4, c)
    assert float(t["blocks.0.self_attn.to_v.lora_alpha"]) == 2.0
    b = t["blocks.1.adaln_linear_1.lora_B"]
    assert b.shape == (6 * c, 24) and not b[c:, :4].any()
    for name in ("refinement", "r2"):
        back = tmp_path / f"{name}.safetensors"
        rc, _, err = _cli(capsys, "export", name, "-m", fastvideo, "--format", "native", "--out",
                          back)
        assert rc == 0, err
        assert _same_tensors(native / "lora" / HUB["refinement"], back) == []
    d0 = lf.effective_deltas(native / "lora" / HUB["refinement"])
    d1 = lf.effective_deltas(stored)
    assert set(d0) == set(d1) and all(torch.equal(d0[k], d1[k]) for k in d0)


def test_register_existing_records_convert_sources(native, fastvideo):
    added = lora_lib.register_existing(
        fastvideo, sources={n: native / "lora" / f for n, f in HUB.items()})
    assert sorted(a.name for a in added) == ["distilled", "refinement"]
    reg = lora_lib.load_registry(layouts.detect(fastvideo))
    rec = reg.get("distilled")
    assert (rec.file, rec.format, rec.rank, rec.alpha) == (
        "distilled/cfg_step_lora.safetensors", "fastvideo", 4, 2.0)
    assert rec.source == {"file": str(native / "lora" / HUB["distilled"]), "format": "native",
                          "sha256": _sha(native / "lora" / HUB["distilled"])}
    assert "blocks.*.self_attn.to_q" in rec.targets and "blocks.*.attn.qkv" not in rec.targets
    assert lora_lib.register_existing(fastvideo) == []


def _checksums(root):
    lines = [f"{_sha(p)}  {p.relative_to(root).as_posix()}" for p in sorted(root.rglob("*"))
             if p.is_file()]
    (root / "checksums.sha256").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("layout", ["native", "fastvideo"])
def test_fuse_merges_exactly_and_streams(native, fastvideo, tmp_path, capsys, layout):
    """fused W == W + sum(scale * alpha/rank * B @ A) (fp32, rel < 1e-6, recomputed here in
    float64 from the hub files), every other tensor bit-identical, untouched shards hard-linked,
    the source unchanged, lora/ without the fused adapters, the fuse noted, checksums true."""
    src = native if layout == "native" else fastvideo
    lora_lib.register_existing(src)
    _checksums(src)
    before = {p: _sha(p) for p in src.rglob("*") if p.is_file()}
    dst = tmp_path / "fused"
    rc, out, err = _cli(capsys, "fuse", "distilled:0.5,refinement", "--dst", dst, "-m", src,
                        "--json")
    assert rc == 0, err
    assert {p: _sha(p) for p in src.rglob("*") if p.is_file()} == before
    ckpt, fused = layouts.detect(src), layouts.detect(dst)
    hub = {n: lf.effective_deltas(native / "lora" / f) for n, f in HUB.items()}
    a, b = layouts.transformer_shards(ckpt), layouts.transformer_shards(fused)
    assert set(a) == set(b)
    adapted = 0
    for name, path in a.items():
        with open(path, "rb") as f:
            w = read_tensor(f, read_header(path).tensors[name])
        with open(b[name], "rb") as f:
            got = read_tensor(f, read_header(b[name]).tensors[name])
        assert got.dtype == w.dtype
        native_name = name if layout == "native" else keymap.fastvideo_to_native(name).native
        module = native_name[: -len(".weight")]
        terms = [k * hub[n][module] for n, k in (("distilled", 0.5), ("refinement", 1.0))
                 if name.endswith(".weight") and module in hub[n]]
        if not terms:
            assert torch.equal(got, w), name
            continue
        delta = sum(terms)
        if layout == "fastvideo":
            part = keymap.fastvideo_to_native(name)
            delta = delta.chunk(part.count, 0)[part.index]
        want = w.double() + delta
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-6, name
        assert float((got.double() - w.double()).abs().max()) > 0
        adapted += 1
    # refinement adapts 8 modules per block + 2 (a superset of cfg_step's); in FastVideo keys
    # qkv is 3 tensors and kv 2
    assert adapted == (2 * 8 + 2 if layout == "native" else 2 * 11 + 2)
    assert lora_lib.fuse_error(src, dst, [("distilled", 0.5), ("refinement", 1.0)])[0] < 1e-6
    assert not any(p.suffix == ".safetensors" for p in (dst / "lora").rglob("*")) if (
        dst / "lora").exists() else True
    cfg = json.loads(fused.config_path.read_text())
    assert [n["name"] for n in cfg["_fused_loras"]] == ["distilled", "refinement"]
    assert schemas.errors(cfg, "transformer_config") == []
    reg = json.loads((dst / "lora" / "adapters.json").read_text())
    assert reg["adapters"] == []
    for line in (dst / "checksums.sha256").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        assert _sha(dst / rel) == digest, rel
    assert json.loads(out)["adapted_tensors"] == adapted


def test_fuse_rewrites_only_shards_with_adapted_weights(native, tmp_path, capsys):
    """An adapter on one module: --dry-run writes nothing; the fuse rewrites the one shard that
    holds the weight and hard-links the others (or copies them with --copy)."""
    src = tmp_path / "one.safetensors"
    g = torch.Generator().manual_seed(5)
    _native_lora(src, {"blocks.0.attn.proj": (torch.randn(3, 64, generator=g),
                                              [torch.randn(64, 3, generator=g)])})
    assert _cli(capsys, "attach", src, "--name", "one", "-m", native, "--scale", "2")[0] == 0
    dst = tmp_path / "fused"
    rc, out, _ = _cli(capsys, "fuse", "one", "--dst", dst, "-m", native, "--dry-run", "--json")
    plan = json.loads(out)
    assert rc == 0 and plan["adapted_tensors"] == 1 and not dst.exists()
    assert plan["shards_rewritten"] == ["diffusion_pytorch_model-00001-of-00005.safetensors"]
    for copy in (False, True):
        args = ["fuse", "one", "--dst", dst, "-m", native, "--force"] + (["--copy"] if copy else [])
        assert _cli(capsys, *args)[0] == 0
        same = [q.name for q in sorted((dst / "dit").glob("*.safetensors"))
                if q.stat().st_ino == (native / "dit" / q.name).stat().st_ino]
        assert same == ([] if copy else [f"diffusion_pytorch_model-0000{k}-of-00005.safetensors"
                                          for k in range(2, 6)])
        err, n = lora_lib.fuse_error(native, dst, [("one", 2.0)])  # the default scale
        assert n == 1 and err < 1e-6
    assert sorted(p.name for p in (dst / "lora").iterdir()) == [
        "adapters.json", HUB["distilled"], HUB["refinement"]]


def _native_lora(path, modules):
    tensors = {}
    for module, (down, ups) in modules.items():
        base = lf.native_key_module(module)
        tensors[f"{base}.lora_down.weight"] = down
        if len(ups) == 1:
            tensors[f"{base}.lora_up.weight"] = ups[0]
        else:
            for j, u in enumerate(ups):
                tensors[f"{base}.lora_up.blocks.{j}.weight"] = u
        tensors[f"{base}.alpha_scale"] = torch.tensor(0.5)
    save_file(tensors, str(path))


def _bad_file(tmp_path, kind):
    path = tmp_path / "bad.safetensors"
    r = torch.ones
    if kind == "missing target":
        _native_lora(path, {"blocks.0.attn.proj": (r(2, 64), [r(64, 2)]),
                            "blocks.7.attn.proj": (r(2, 64), [r(64, 2)])})
    elif kind == "wrong shape":
        _native_lora(path, {"blocks.0.attn.proj": (r(2, 128), [r(128, 2)])})
    elif kind == "non-finite":
        up = r(64, 2)
        up[3, 1] = float("nan")
        _native_lora(path, {"blocks.0.ffn.w2": (r(2, DIMS_FFN), [r(64, 2)]),
                            "blocks.1.attn.proj": (r(2, 64), [up])})
    elif kind == "not safetensors":
        path.write_text("this is not a LoRA\n" * 10)
    elif kind == "pickle":
        path = tmp_path / "bad.pt"
        path.write_bytes(b"\x80\x04K\x01.")
    elif kind == "split part missing":
        save_file({"blocks.0.self_attn.to_q.lora_A": r(2, 64),
                   "blocks.0.self_attn.to_q.lora_B": r(64, 2)}, str(path))
    return path


DIMS_FFN = 256


@pytest.mark.parametrize("kind,match", [
    ("missing target", "blocks.7.attn.proj"),
    ("wrong shape", "128x128 but the DiT layer is 64x64"),
    ("non-finite", "blocks___lorahyphen___1___lorahyphen___attn___lorahyphen___proj.lora_up"),
    ("not safetensors", "not safetensors"),
    ("pickle", "pickle"),
    ("split part missing", "needs all of"),
])
@pytest.mark.parametrize("layout", ["native", "fastvideo"])
def test_bad_adapters_are_one_line_exit_1_nothing_written(native, fastvideo, tmp_path, capsys,
                                                          kind, match, layout):
    root = native if layout == "native" else fastvideo
    path = _bad_file(tmp_path, kind)
    before = _tree(root)
    rc, out, err = _cli(capsys, "attach", path, "--name", "bad", "-m", root)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err
    assert _tree(root) == before


def test_usage_errors_exit_2(native, capsys, tmp_path):
    hidden = tmp_path / ".safetensors"  # was written, a hidden file
    for args in (["export", "nope", "-m", native, "--format", "peft", "--out", "/tmp/x.st"],
                 ["export", "distilled", "-m", native, "--format", "native", "--out", hidden],
                 ["detach", "nope", "-m", native],
                 ["fuse", "nope", "--dst", native.parent / "f", "-m", native],
                 ["attach", native / "lora" / HUB["distilled"], "--name", "../x", "-m", native],
                 ["export", "distilled", "-m", native, "--format", "kohya", "--out", "/tmp/x"]):
        rc, _, err = _cli(capsys, *args)
        assert rc == 2, (args, err)
    assert not hidden.exists()


@pytest.mark.parametrize("name", ["adapters.json", "adapters.json.lock", "x.partial",
                                  "x.safetensors"])
def test_the_registry_files_and_scratch_names_are_reserved(native, capsys, name):
    """An adapter folder named like the registry's lock replaced the lock a writer held; one
    named like an adapter file failed verify."""
    before = _tree(native)
    rc, _, err = _cli(capsys, "attach", native / "lora" / HUB["distilled"], "--name", name,
                      "--force", "-m", native)
    assert rc == 2 and "is reserved" in err, err
    assert _tree(native) == before


def _second_writer(ckpt, timeout: float) -> list[str]:
    """The errors of a second thread taking the registry lock while this one holds it."""
    errors = []

    def second():
        try:
            with lora_lib.registry_lock(ckpt, timeout=timeout):
                pass
        except LongcatError as e:
            errors.append(str(e))

    with lora_lib.registry_lock(ckpt):
        t = threading.Thread(target=second)
        t.start()
        t.join()
    return errors


def test_registry_lock_serializes_writers(native):
    ckpt = layouts.detect(native)
    errors = _second_writer(ckpt, 0.2)
    assert len(errors) == 1 and "held the lock" in errors[0]
    with lora_lib.registry_lock(ckpt, timeout=0.2):  # free again once released
        pass
    assert not (native / "lora" / "adapters.json.lock").exists()


def test_a_wait_on_the_registry_lock_says_what_it_waits_for(native, monkeypatch, caplog):
    """A second `lora attach` waited up to ten minutes without a word."""
    from longcat_tools.io import atomic

    monkeypatch.setattr(atomic, "WAIT_NOTE_S", 0.05)
    caplog.set_level(logging.WARNING, logger="longcat_tools")  # an earlier -q raised it
    errors = _second_writer(layouts.detect(native), 0.3)
    waits = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waits) == 1 and "adapters.json.lock" in waits[0], waits
    assert len(errors) == 1 and "held the lock" in errors[0]


def test_an_alpha_that_is_not_one_value_is_refused_at_attach(native, tmp_path, capsys):
    """An alpha_scale of shape [3] was attached as its mean and listed 'ok'; verify then failed
    the checkpoint and `lora export` stopped with an internal error."""
    tensors = load_file(native / "lora" / "cfg_step_lora.safetensors")
    key = next(k for k in tensors if k.endswith(".alpha_scale"))
    tensors[key] = torch.full((3,), 0.5)
    bad = tmp_path / "alpha3.safetensors"
    save_file(tensors, bad)
    assert main(["lora", "attach", str(bad), "--name", "style", "-m", str(native)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert key in line and "must be a float scalar" in line
    assert not (native / "lora" / "style").exists()


def test_killed_attach_leaves_no_adapter(native, tmp_path, monkeypatch):
    """A failure mid-write (here: the writer raises after the first module) leaves no
    lora/NAME/, no registry entry and no .partial folder."""
    calls = {"n": 0}
    real = lf.output_tensors

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(lf, "output_tensors", boom)
    with pytest.raises(OSError):
        lora_lib.attach(native, native / "lora" / HUB["refinement"], "half")
    assert not (native / "lora" / "half").exists()
    assert not (native / "lora" / "half.partial").exists()
    reg = lora_lib.load_registry(layouts.detect(native))
    assert reg.get("half") is None
    assert os.listdir(native / "lora").count("adapters.json.lock") == 0


def test_hugging_face_cache_snapshot_is_read_never_written(native, tmp_path, capsys):
    """A cache snapshot (files are symlinks into blobs/): list and fuse read it, attach and
    detach refuse it in one line."""
    from hf_cache import build_cache

    snap = build_cache(native, tmp_path / "hub")
    rc, out, err = _cli(capsys, "list", "-m", snap, "--json")
    assert rc == 0, err
    assert {a["name"]: a["status"] for a in json.loads(out)["adapters"]} == {
        "distilled": "ok", "refinement": "ok"}
    before = _tree(tmp_path / "hub")
    for args in (["attach", native / "lora" / HUB["distilled"], "--name", "x"],
                 ["detach", "distilled", "--force"]):
        rc, _, err = _cli(capsys, *args, "-m", snap)
        assert rc == 1 and "Hugging Face cache" in err and len(err.strip().splitlines()) == 1
    assert _tree(tmp_path / "hub") == before
    rc, _, err = _cli(capsys, "fuse", "distilled", "--dst", tmp_path / "fused", "-m", snap)
    assert rc == 0, err
    assert lora_lib.fuse_error(native, tmp_path / "fused", [("distilled", 1.0)])[0] < 1e-6
    assert not any(p.is_symlink() for p in (tmp_path / "fused").rglob("*"))


def test_dry_run_attach_checks_values_and_writes_nothing(native, tmp_path, capsys):
    path = _bad_file(tmp_path, "non-finite")
    before = _tree(native)
    rc, _, err = _cli(capsys, "attach", path, "--name", "x", "-m", native, "--dry-run")
    assert rc == 1 and "NaN or Inf" in err
    rc, out, err = _cli(capsys, "attach", native / "lora" / HUB["distilled"], "--name", "x",
                        "-m", native, "--dry-run", "--json")
    assert rc == 0 and json.loads(out)["dry_run"] is True
    assert _tree(native) == before


def test_export_fp16_refuses_values_it_cannot_hold(native, tmp_path, capsys):
    """export --dtype fp16 of an adapter with a weight of 1e6: one line naming the stored tensor,
    exit 1, no output file and no .partial; bf16 holds it."""
    path = native / "lora" / HUB["distilled"]
    t = load_file(str(path))
    down = sorted(k for k in t if k.endswith(".lora_down.weight"))[0]
    t[down] = t[down].clone()
    t[down].view(-1)[0] = -1e6
    save_file(t, str(path), metadata={"format": "pt"})
    out = tmp_path / "out.safetensors"
    rc, _, err = _cli(capsys, "export", "distilled", "--format", "fastvideo", "--out", out,
                      "--dtype", "fp16", "-m", native)
    (line,) = err.strip().splitlines()
    assert rc == 1 and "overflows float16" in line and f"'{down}'" in line, err
    assert not out.exists() and not (tmp_path / "out.safetensors.partial").exists()
    assert _cli(capsys, "export", "distilled", "--format", "fastvideo", "--out", out,
                "--dtype", "bf16", "-m", native)[0] == 0


def test_fuse_syncs_its_partial_folder_and_lists_what_it_wrote(native, tmp_path, capsys,
                                                               monkeypatch):
    """fuse fsyncs DST.partial before the rename, and its checksums.sha256 (the source has none)
    lists the files it wrote, each true."""
    from longcat_tools.lora import fusion

    synced = []
    real = fusion.fsync_tree
    monkeypatch.setattr(fusion, "fsync_tree", lambda p: synced.append(p.name) or real(p))
    assert not (native / "checksums.sha256").exists()
    dst = tmp_path / "fused"
    assert _cli(capsys, "fuse", "distilled", "--dst", dst, "-m", native)[0] == 0
    assert synced == ["fused.partial"] and not (tmp_path / "fused.partial").exists()
    listed = dict(reversed(line.split("  ", 1)) for line in
                  (dst / "checksums.sha256").read_text().splitlines())
    assert "dit/config.json" in listed and any(r.endswith(".safetensors") for r in listed)
    assert all(_sha(dst / rel) == digest for rel, digest in listed.items())


@pytest.mark.parametrize("line", ["not a checksum line", f"{'0' * 64}  ../outside.txt"])
def test_fuse_refuses_a_bad_checksum_list_before_writing(native, tmp_path, capsys, line):
    """The source's checksums.sha256 is read while planning: a bad line or a path leaving the
    checkpoint stops `fuse` (and its --dry-run) in one line, before any shard is written."""
    (native / "checksums.sha256").write_text(line + "\n")
    dst = tmp_path / "fused"
    for extra in (["--dry-run"], []):
        rc, _, err = _cli(capsys, "fuse", "distilled", "--dst", dst, "-m", native, *extra)
        assert rc == 1, err
        (err,) = err.strip().splitlines()
        assert "checksums.sha256" in err and str(native) in err and ".partial" not in err
    assert not dst.exists() and not (tmp_path / "fused.partial").exists()


@pytest.mark.parametrize("args", [["fuse", "distilled:nan", "--dst", "{dst}"],
                                  ["fuse", "distilled:1e308", "--dst", "{dst}"],
                                  ["fuse", "distilled", "--scale", "inf", "--dst", "{dst}"],
                                  ["attach", "{file}", "--name", "big", "--scale", "1e308"]])
def test_a_lora_scale_past_ten_is_refused_in_one_line(native, tmp_path, capsys, args):
    """The same bound as run's --lora-scale; an attached scale of 1e308 used to make every
    later fuse fail, and a NaN one failed while writing JSON."""
    before = _tree(native)
    args = [a.format(dst=tmp_path / "fused", file=native / "lora" / HUB["distilled"])
            for a in args]
    rc, _, err = _cli(capsys, *args, "-m", native)
    assert rc == 2, err
    (err,) = err.strip().splitlines()
    assert "a LoRA scale must be a number from -10 to 10" in err
    assert _tree(native) == before and not (tmp_path / "fused").exists()


@pytest.mark.parametrize("spec", ["distilled:", "distilled,,refinement", ",distilled", ":0.5"])
def test_an_empty_name_or_scale_in_a_fuse_list_is_refused(native, tmp_path, capsys, spec):
    """'distilled:' fused at the default scale and 'a,,b' skipped the gap, silently."""
    rc, _, err = _cli(capsys, "fuse", spec, "--dst", tmp_path / "f", "-m", native, "--dry-run")
    assert rc == 2 and "an empty adapter name or scale" in err, err


@pytest.mark.parametrize("config", ["missing.json", "given"])
def test_an_adapter_config_is_never_ignored(native, tmp_path, capsys, config):
    """A native adapter carries its own alphas: a config given with it, or one that is not
    there, used to be accepted and ignored."""
    (tmp_path / "given").write_text('{"r": 4, "lora_alpha": 4}')
    before = _tree(native)
    rc, _, err = _cli(capsys, "attach", native / "lora" / HUB["distilled"], "--name", "x",
                      "--adapter-config", tmp_path / config, "-m", native)
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert ("no such file" if config != "given" else "only a PEFT file") in line
    assert _tree(native) == before


def test_a_registry_scale_beyond_the_limit_is_refused(native, tmp_path, capsys):
    """--scale and NAME:SCALE are held to the limit; a hand-edited default_scale was fused as
    is (50x)."""
    assert _cli(capsys, "attach", native / "lora" / HUB["distilled"], "--name", "mine", "-m",
                native)[0] == 0
    path = native / "lora" / "adapters.json"
    reg = json.loads(path.read_text())
    next(a for a in reg["adapters"] if a["name"] == "mine")["default_scale"] = 50.0
    path.write_text(json.dumps(reg))
    for args in (["fuse", "mine", "--dst", tmp_path / "f", "-m", native], ["list", "-m", native]):
        rc, _, err = _cli(capsys, *args)
        assert rc == 1 and "adapter 'mine' default_scale 50" in err, err
    assert not (tmp_path / "f").exists()


def test_fuse_refuses_an_index_that_disagrees_with_its_shards(native, tmp_path, capsys):
    """fuse copies the index: one that maps a tensor to the wrong shard was copied as is, into
    a checkpoint that verify then failed (convert, run and verify refuse it)."""
    path = native / "dit" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    wm["x_embedder.proj.weight"] = next(s for s in sorted(set(wm.values()))
                                        if s != wm["x_embedder.proj.weight"])
    path.write_text(json.dumps(index))
    rc, _, err = _cli(capsys, "fuse", "distilled", "--dst", tmp_path / "f", "-m", native)
    assert rc == 1 and "the index maps 'x_embedder.proj.weight' to this shard" in err, err
    assert not (tmp_path / "f").exists()


def test_a_fused_checkpoint_passes_verify_strict(native, tmp_path, capsys):
    """Its lora/ lacks the fused hub file by design: verify warned that --distill would not be
    available (it is the only way to run it), so --strict failed every fused checkpoint."""
    assert _cli(capsys, "fuse", "distilled", "--dst", tmp_path / "f", "-m", native)[0] == 0
    assert main(["verify", str(tmp_path / "f"), "--strict", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not [c for c in doc["checks"] if c["status"] != "pass"]


def test_fuse_refuses_an_adapter_fused_already(native, tmp_path, capsys):
    """The hub file attached again under its fused name was fused a second time (exit 0):
    _fused_loras listed it twice and run applied it twice."""
    once = tmp_path / "once"
    assert _cli(capsys, "fuse", "distilled", "--dst", once, "-m", native)[0] == 0
    assert _cli(capsys, "attach", native / "lora" / HUB["distilled"], "--name", "distilled",
                "-m", once)[0] == 0
    rc, _, err = _cli(capsys, "fuse", "distilled", "--dst", tmp_path / "twice", "-m", once)
    assert rc == 2 and "adapter 'distilled' is already fused into" in err, err
    assert not (tmp_path / "twice").exists()


def test_fuse_leaves_the_bsa_backup_behind_and_says_when_run_cannot_use_it(native, tmp_path,
                                                                          capsys):
    """The source's dit/config.json.bak was hard-linked into the fused checkpoint: `bsa restore`
    there brought back the unfused config, and run took the distilled weights as the base."""
    assert main(["bsa", "preset", "720p-fast", "-m", str(native), "-q"]) == 0
    assert (native / "dit" / "config.json.bak").exists()
    dst = tmp_path / "fused"
    assert _cli(capsys, "fuse", "distilled", "--dst", dst, "-m", native)[0] == 0
    assert not (dst / "dit" / "config.json.bak").exists()
    assert main(["bsa", "restore", "-m", str(dst), "-q"]) == 1
    assert "no backup to restore" in capsys.readouterr().err
    rc, _, err = _cli(capsys, "fuse", "refinement", "--dst", tmp_path / "both", "-m", dst)
    assert rc == 0 and "warning: distilled and refinement are both fused in: `run` refuses" in err


def test_convert_keeps_each_adapters_name_and_default_scale(native, tmp_path, capsys):
    """convert registered adapters afresh from the files: 'mine' attached at 0.3 came out at
    scale 1 (fused and run 3.3x too strong) and, in the hub layout, renamed to its file's stem."""
    shutil.copy(native / "lora" / HUB["distilled"], tmp_path / "my.safetensors")
    assert main(["lora", "attach", str(tmp_path / "my.safetensors"), "--name", "mine",
                 "--scale", "0.3", "-m", str(native), "-q"]) == 0
    conv, back = tmp_path / "conv", tmp_path / "back"
    assert main(["convert", "--src", str(native), "--dst", str(conv), "-q"]) == 0
    assert main(["convert", "--src", str(conv), "--dst", str(back), "--to", "native", "-q"]) == 0
    for root, file in ((native, "mine/my.safetensors"), (conv, "mine/my.safetensors"),
                       (back, "mine/my.safetensors")):
        reg = lora_lib.load_registry(layouts.detect(root))
        assert sorted(a.name for a in reg.adapters) == ["distilled", "mine", "refinement"]
        assert (reg.get("mine").file, reg.get("mine").default_scale) == (file, 0.3), root
        assert reg.get("distilled").default_scale == 1.0
    assert (back / "lora" / HUB["distilled"]).is_file()  # the hub's files stay where it has them
    fused = {}
    for root in (native, conv):
        assert main(["lora", "fuse", "mine", "-m", str(root), "--dst",
                     str(tmp_path / f"fused_{root.name}"), "-q"]) == 0
        dit = layouts.detect(tmp_path / f"fused_{root.name}").transformer_dir
        cfg = json.loads((dit / "config.json").read_text())
        fused[root.name] = cfg[layouts.FUSED_CONFIG_KEY][0]["scale"]
    assert fused == {native.name: 0.3, conv.name: 0.3}


def test_convert_to_native_keeps_an_adapter_named_as_its_file_in_its_folder(native, tmp_path):
    """lora/x/x.safetensors came out flat, where `lora detach` took it for a release file."""
    shutil.copy(native / "lora" / HUB["distilled"], tmp_path / "x.safetensors")
    assert main(["lora", "attach", str(tmp_path / "x.safetensors"), "--name", "x", "-m",
                 str(native), "-q"]) == 0
    conv, back = tmp_path / "conv", tmp_path / "back"
    assert main(["convert", "--src", str(native), "--dst", str(conv), "-q"]) == 0
    assert main(["convert", "--src", str(conv), "--dst", str(back), "--to", "native", "-q"]) == 0
    assert sorted(p.relative_to(back / "lora").as_posix()
                  for p in (back / "lora").rglob("*.safetensors")) == sorted(
        [*HUB.values(), "x/x.safetensors"])
    assert main(["lora", "detach", "x", "-m", str(back), "-q"]) == 0
    assert not (back / "lora" / "x").exists()


def test_convert_names_a_folder_of_several_adapters_as_lora_list_does(native, tmp_path, capsys):
    pack = native / "lora" / "pack"
    pack.mkdir()
    for stem in ("a", "b"):
        shutil.copy(native / "lora" / HUB["distilled"], pack / f"{stem}.safetensors")
    assert sorted(n for n in lora_lib.discover(layouts.detect(native)) if "/" in n) == [
        "pack/a", "pack/b"]
    out = tmp_path / "conv"  # 'pack/a' was "no adapter named" (convert called both 'pack')
    assert main(["convert", "--src", str(native), "--dst", str(out), "--lora", "pack/a",
                 "-q"]) == 0
    assert sorted(p.name for p in (out / "lora" / "pack").iterdir()) == ["a.safetensors"]


def test_convert_refuses_a_registry_it_cannot_read(native, tmp_path, capsys):
    """It named the adapters by their files at scale 1, as if there were no registry."""
    shutil.copy(native / "lora" / HUB["distilled"], tmp_path / "my.safetensors")
    assert main(["lora", "attach", str(tmp_path / "my.safetensors"), "--name", "mine",
                 "--scale", "0.3", "-m", str(native), "-q"]) == 0
    reg = native / "lora" / "adapters.json"
    doc = json.loads(reg.read_text())
    doc["adapters"].append(dict(doc["adapters"][-1]))  # listed twice
    reg.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["convert", "--src", str(native), "--dst", str(tmp_path / "c"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "listed twice" in err and "convert carries each adapter's name" in err
    assert not (tmp_path / "c").exists()
    assert main(["convert", "--src", str(native), "--dst", str(tmp_path / "c"), "--lora", "none",
                 "-q"]) == 0


def _one_module_lora(path, rank: int, alpha: float) -> None:
    """A native-format file adapting blocks.0.attn.proj (64 x 64 in the tiny DiT)."""
    key = lf.native_key_module("blocks.0.attn.proj")
    save_file({f"{key}.lora_down.weight": torch.ones(rank, 64),
               f"{key}.lora_up.weight": torch.ones(64, rank),
               f"{key}.alpha_scale": torch.tensor(alpha)}, str(path))


@pytest.mark.parametrize("rank, alpha, says", [
    (0, 0.5, "has rank 0"), (4, 0.0, "alpha_scale 0, not a positive number"),
    (4, -0.5, "alpha_scale -0.5, not a positive number"), (4, float("nan"), "alpha_scale nan")])
def test_a_rank_0_or_non_positive_alpha_is_refused_by_every_command(native, tmp_path, capsys,
                                                                    rank, alpha, says):
    """Rank 0 was an internal error (ZeroDivisionError) in attach and convert, and passed list,
    verify and fuse; alpha_scale <= 0 passed attach --dry-run and then named a scratch file."""
    bad = tmp_path / "bad.safetensors"
    _one_module_lora(bad, rank, alpha)
    for extra in (["--dry-run"], []):
        rc, _, err = _cli(capsys, "attach", bad, "--name", "bad", "-m", native, *extra)
        assert rc == 1 and err.startswith(f"error: {bad}: ") and says in err, err
    shutil.copy(bad, native / "lora" / "bad.safetensors")  # put in place by hand
    rc, _, err = _cli(capsys, "list", "-m", native)
    assert rc == 1 and says in err
    assert _cli(capsys, "fuse", "bad", "--dst", tmp_path / "f", "-m", native)[0] == 1
    assert main(["convert", "--src", str(native), "--dst", str(tmp_path / "c"), "-q"]) == 1
    assert says in capsys.readouterr().err
    shutil.copy(native / "lora" / HUB["distilled"], tmp_path / "ok.safetensors")
    rc, _, err = _cli(capsys, "attach", tmp_path / "ok.safetensors", "--name", "ok", "-m", native)
    assert rc == 0, err  # the broken file blocks no other adapter
    assert main(["verify", str(native), "-q"]) == 1  # --deep --strict passed a bad alpha
    err = capsys.readouterr().err
    assert ("has rank 0" if rank == 0 else "alphas that are not a positive number") in err, err


def test_attach_force_replaces_only_the_adapter_it_names(native, tmp_path, capsys):
    """--force replaced lora/NAME/ whole: the adapters pack/a and pack/b, or a README, went
    with it, exit 0."""
    ok = tmp_path / "ok.safetensors"
    shutil.copy(native / "lora" / HUB["distilled"], ok)
    pack, notes, empty = (native / "lora" / n for n in ("pack", "notes", "empty"))
    pack.mkdir()
    for stem in ("a", "b"):
        shutil.copy(ok, pack / f"{stem}.safetensors")
    notes.mkdir()
    (notes / "README.txt").write_text("mine")
    empty.mkdir()
    for name, holds in (("pack", "a.safetensors, b.safetensors"), ("notes", "README.txt")):
        for force in ([], ["--force"]):
            rc, _, err = _cli(capsys, "attach", ok, "--name", name, "-m", native, *force)
            assert rc == 1 and f"holding {holds}" in err and "no adapter named" in err, err
    assert sorted(p.name for p in pack.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert (notes / "README.txt").read_text() == "mine"
    rc, _, err = _cli(capsys, "attach", ok, "--name", "empty", "-m", native)
    assert rc == 1 and "pass --force to use it" in err
    assert _cli(capsys, "attach", ok, "--name", "empty", "--force", "-m", native)[0] == 0
    shutil.copy(ok, native / "lora" / "empty" / "extra.safetensors")
    rc, _, err = _cli(capsys, "attach", ok, "--name", "empty", "--force", "-m", native)
    assert rc == 1 and "also holds extra.safetensors" in err
    assert (native / "lora" / "empty" / "extra.safetensors").is_file()


def test_a_hidden_file_name_is_stored_under_the_adapters_name(native, tmp_path, capsys):
    """A file named '.safetensors' was stored as lora/hid/.safetensors, which fuse skipped (the
    fused copy's registry then named a missing file)."""
    hidden = tmp_path / ".safetensors"
    shutil.copy(native / "lora" / HUB["distilled"], hidden)
    assert _cli(capsys, "attach", hidden, "--name", "hid", "-m", native)[0] == 0
    assert [p.name for p in (native / "lora" / "hid").iterdir()] == ["hid.safetensors"]
    assert _cli(capsys, "fuse", "distilled", "--dst", tmp_path / "fused", "-m", native)[0] == 0
    assert (tmp_path / "fused" / "lora" / "hid" / "hid.safetensors").is_file()
    assert main(["verify", str(tmp_path / "fused"), "-q"]) == 0


def test_a_peft_alpha_stored_as_an_integer_is_read_as_comfy_reads_one(native, tmp_path,
                                                                       capsys):
    """kohya-style files may store `.alpha` as an int64: the comfy reader took it, the PEFT
    reader refused it as "must be a float scalar"."""
    peft = tmp_path / "peft.safetensors"
    assert _cli(capsys, "export", "distilled", "--format", "peft", "--out", peft, "-m",
                native)[0] == 0
    tensors = load_file(peft)
    modules = {k.rsplit(".lora_A", 1)[0] for k in tensors if ".lora_A" in k}
    for dtype, path in ((torch.int64, tmp_path / "int.safetensors"),
                        (torch.float32, tmp_path / "float.safetensors")):
        save_file({**tensors, **{f"{m}.alpha": torch.tensor(2, dtype=dtype) for m in modules}},
                  str(path))
    got, want = (lf.read_lora(tmp_path / f"{n}.safetensors") for n in ("int", "float"))
    assert {m: float(e.alpha_scale) for m, e in got.modules.items()} == {
        m: float(e.alpha_scale) for m, e in want.modules.items()}
    tensors[f"{sorted(modules)[0]}.alpha"] = torch.tensor(True)
    save_file(tensors, str(tmp_path / "bool.safetensors"))
    with pytest.raises(LongcatError, match="must be one number, got torch.bool"):
        lf.read_lora(tmp_path / "bool.safetensors")


def test_export_checks_its_output_again_under_the_lock(native, tmp_path, capsys, monkeypatch):
    """Two exports to one --out: the second, checked before the first had written, replaced
    the first's file without --force."""
    import contextlib

    from longcat_tools.lora import adapters

    out = tmp_path / "same.safetensors"
    real = adapters.writer_lock

    @contextlib.contextmanager
    def after_another_export(dst):
        out.write_bytes(b"the other export's file")  # it finished while this one read
        with real(dst) as clear:
            yield clear

    monkeypatch.setattr(adapters, "writer_lock", after_another_export)
    rc, _, err = _cli(capsys, "export", "distilled", "-m", native, "--format", "peft", "--out",
                      out)
    assert rc == 1 and "already exists" in err, err
    assert out.read_bytes() == b"the other export's file"


def test_an_adapter_holding_nan_is_refused_by_convert_export_and_run(native, tmp_path, capsys,
                                                                    monkeypatch):
    """Only attach refused it: convert copied the NaN into the new checkpoint, export wrote
    it, and run made a NaN video after the whole denoise (then refused it after loading the
    weights)."""
    path = native / "lora" / HUB["distilled"]
    doc = load_file(str(path))
    key = next(k for k in doc if "lora_up" in k)
    doc[key][0, 0] = float("nan")
    save_file(doc, str(path))
    says = "holds NaN or Inf values"
    assert main(["convert", "--src", str(native), "--dst", str(tmp_path / "c"), "-q"]) == 1
    assert says in capsys.readouterr().err and not (tmp_path / "c").exists()
    rc, _, err = _cli(capsys, "export", "distilled", "--format", "peft", "-m", native, "--out",
                      tmp_path / "x.safetensors")
    assert rc == 1 and says in err and not (tmp_path / "x.safetensors").exists()
    from longcat_tools.runner import job

    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded weights"))
    assert main(["run", "-q", "-m", str(native), "-p", "a cat", "--distill", "--height", "32",
                 "--width", "32", "--frames", "9", "--device", "cpu",
                 "--out", str(tmp_path / "v.mp4")]) == 1
    err = capsys.readouterr().err  # found before the weights load
    assert f"{path}: tensor '{key}'" in err and "the run would make a NaN video" in err, err
