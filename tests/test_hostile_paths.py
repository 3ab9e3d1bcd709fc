"""Hostile paths: links, registry entries, lock and backup files, special files and NaN that try
to make ``lora`` or ``bsa`` read, write or delete outside the folder each owns (``lora/`` for
adapters, the config's own folder for bsa), plus ``lora attach``'s rank check and
``lora export --force``'s limits.

Every case runs the real command line in-process through :func:`hostile.refused` (one ``error:``
line, exit 1, never the catch-all) and then checks that nothing outside the owned folder changed:
a snapshot (type, sha256, mtime, link target) of the checkpoint without ``lora/`` and of a folder
outside the checkpoint, taken before and compared after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import refused
from safetensors.torch import save_file

from longcat_tools.cli import main
from longcat_tools.lora import formats as lf

DIT = "dit"
SHARD = "dit/diffusion_pytorch_model-00001-of-00005.safetensors"
CFG = "dit/config.json"
HUB = "cfg_step_lora.safetensors"  # the hub's adapter 'distilled'


@pytest.fixture
def world(tiny_native, tmp_path):
    """A fresh copy of the tiny checkpoint and an outside folder holding a sentinel file."""
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_native, root, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(root / SHARD, outside / "sentinel.safetensors")
    (outside / "config.json").write_text((root / CFG).read_text())
    return root, outside


def snapshot(top: Path, skip: str | None = None) -> dict[str, object]:
    """Every entry under ``top`` (links not followed): a file's sha256 and mtime, a link's
    target, a folder's presence; ``skip`` (a top-level name) left out."""
    seen: dict[str, object] = {}
    for folder, dirs, files in os.walk(top):
        rel_dir = Path(folder).relative_to(top)
        if rel_dir.parts and rel_dir.parts[0] == skip:
            continue
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(rel_dir / name)
            if rel == skip:
                continue
            if p.is_symlink():
                seen[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                seen[rel] = "dir"
            elif p.is_file():
                seen[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            else:
                seen[rel] = ("special", p.lstat().st_mode)
    return seen


def native_lora(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    tensors = {}
    for module, (down, up) in modules.items():
        base = lf.native_key_module(module)
        tensors[f"{base}.lora_down.weight"] = down
        tensors[f"{base}.lora_up.weight"] = up
        tensors[f"{base}.alpha_scale"] = torch.tensor(0.5)
    save_file(tensors, str(path))
    return path


def register(root: Path, name: str, file: str) -> None:
    """An adapters.json entry naming ``file`` (as a hand edit or a hostile checkpoint would)."""
    doc = {"version": 1, "adapters": [{
        "name": name, "file": file, "format": "native", "rank": 4, "alpha": 2.0,
        "targets": ["blocks.*.attn.proj"], "default_scale": 1.0, "source": None}]}
    (root / "lora" / "adapters.json").write_text(json.dumps(doc))


# --- lora cases: each plants something and returns the command that must refuse --------------

def dir_link_to_dit(root, out):
    (root / "lora" / "x").symlink_to(Path("..") / DIT)
    return ["lora", "detach", "x"], "outside"


def dir_link_to_dit_force(root, out):
    (root / "lora" / "x").symlink_to(Path("..") / DIT)
    return ["lora", "detach", "x", "--force"], "outside"


def dir_link_out_of_checkpoint(root, out):
    (root / "lora" / "x").symlink_to(out)
    return ["lora", "detach", "x"], "outside"


def file_link_to_shard(root, out):
    (root / "lora" / "y.safetensors").symlink_to(Path("..") / SHARD)
    return ["lora", "detach", "y", "--force"], "outside"


def file_link_to_sentinel(root, out):
    (root / "lora" / "y.safetensors").symlink_to(out / "sentinel.safetensors")
    return ["lora", "detach", "y", "--force"], "outside"


def link_inside_adapter_folder(root, out):
    (root / "lora" / "z").mkdir()
    (root / "lora" / "z" / "a.safetensors").symlink_to(Path("../..") / SHARD)
    return ["lora", "detach", "z"], "outside"


def entry_through_link(root, out):
    (root / "lora" / "evil").symlink_to(Path("..") / DIT)
    register(root, "e", f"evil/{Path(SHARD).name}")
    return ["lora", "detach", "e"], "outside"


def entry_dotdot(root, out):
    register(root, "e", f"../{SHARD}")
    return ["lora", "detach", "e"], "adapters.json"


def entry_absolute(root, out):
    register(root, "e", str(out / "sentinel.safetensors"))
    return ["lora", "detach", "e"], "adapters.json"


def export_entry_through_link(root, out):
    (root / "lora" / "evil").symlink_to(Path("..") / DIT)
    register(root, "e", f"evil/{Path(SHARD).name}")
    return ["lora", "export", "e", "--format", "native", "--out", out / "e.safetensors"], \
        "outside"


def fuse_dir_link(root, out):
    (root / "lora" / "x").symlink_to(Path("..") / DIT)
    return ["lora", "fuse", "x", "--dst", out / "fused"], "outside"


def lora_folder_is_link(root, out):
    shutil.rmtree(root / "lora")
    (root / "lora").symlink_to(DIT)
    return ["lora", "detach", Path(SHARD).name[:-12], "--force"], "symlink"


def list_lora_folder_is_link(root, out):
    shutil.rmtree(root / "lora")
    (root / "lora").symlink_to(DIT)
    return ["lora", "list"], "symlink"


def attach_lora_folder_is_link(root, out):
    shutil.rmtree(root / "lora")
    (root / "lora").symlink_to(out)
    return ["lora", "attach", out / "sentinel.safetensors", "--name", "a"], "symlink"


def registry_is_link_out(root, out):
    (root / "lora" / "adapters.json").symlink_to(out / "config.json")
    return ["lora", "list"], "outside"


def registry_lock_is_link(root, out):
    (root / "lora" / "adapters.json.lock").symlink_to(out / "planted.lock")
    return ["lora", "attach", _small_lora(out), "--name", "a"], "link"


def registry_lock_is_fifo(root, out):
    os.mkfifo(root / "lora" / "adapters.json.lock")
    return ["lora", "attach", _small_lora(out), "--name", "a"], "lock"


def attach_name_is_link(root, out):
    (root / "lora" / "a").symlink_to(out)
    return ["lora", "attach", _small_lora(out), "--name", "a", "--force"], "symlink"


def link_loop(root, out):
    (root / "lora" / "loop.safetensors").symlink_to("loop.safetensors")
    return ["lora", "detach", "loop", "--force"], "cannot be resolved"


def _small_lora(out: Path) -> Path:
    r = torch.ones
    return native_lora(out / "small.safetensors", {"blocks.0.attn.proj": (r(2, 64), r(64, 2))})


# --- class 4: attach's rank, export --force ---------------------------------------------------

def rank_too_large(root, out):
    r = torch.ones
    src = native_lora(out / "r65.safetensors", {"blocks.0.attn.proj": (r(65, 64), r(64, 65))})
    return ["lora", "attach", src, "--name", "big"], "rank 65, more than the smaller side of " \
        "its 64x64 weight"


def rank_too_large_dry_run(root, out):
    args, says = rank_too_large(root, out)
    return [*args, "--dry-run"], says


def export_force_onto_shard(root, out):
    return ["lora", "export", "distilled", "--format", "native", "--out", root / SHARD,
            "--force"], "inside the checkpoint"


def export_new_file_into_dit(root, out):
    return ["lora", "export", "distilled", "--format", "native", "--out",
            root / DIT / "new.safetensors"], "inside the checkpoint"


def export_force_onto_other_adapter(root, out):
    return ["lora", "export", "distilled", "--format", "native", "--out",
            root / "lora" / "refinement_lora.safetensors", "--force"], "inside the checkpoint"


def export_force_onto_vae(root, out):
    return ["lora", "export", "distilled", "--format", "native", "--out",
            root / "vae" / "diffusion_pytorch_model.safetensors", "--force"], \
        "inside the checkpoint"


def export_force_onto_own_source(root, out):
    return ["lora", "export", "distilled", "--format", "native", "--out",
            root / "lora" / HUB, "--force"], "inside the checkpoint"


def export_new_file_into_lora(root, out):
    return ["lora", "export", "distilled", "--format", "native", "--out",
            root / "lora" / "x.safetensors"], "inside the checkpoint"


def export_new_file_into_vae(root, out):
    return ["lora", "export", "distilled", "--format", "peft", "--out",
            root / "vae" / "extra.safetensors"], "inside the checkpoint"


def export_force_onto_folder(root, out):
    (out / "d.safetensors").mkdir()
    return ["lora", "export", "distilled", "--format", "native", "--out", out / "d.safetensors",
            "--force"], "not a .safetensors file"


def export_force_onto_link(root, out):
    (out / "l.safetensors").symlink_to(root / SHARD)
    return ["lora", "export", "distilled", "--format", "native", "--out", out / "l.safetensors",
            "--force"], "link"


def export_force_onto_non_safetensors(root, out):
    (out / "notes.safetensors").write_text("my notes, not a tensor file\n")
    return ["lora", "export", "distilled", "--format", "native", "--out",
            out / "notes.safetensors", "--force"], "not a safetensors file"


def export_scratch_is_link(root, out):
    (out / "e.safetensors.partial").symlink_to(out / "sentinel.safetensors")
    return ["lora", "export", "distilled", "--format", "native", "--out",
            out / "e.safetensors"], "symlink"


def export_peft_config_is_folder(root, out):
    (out / "adapter_config.json").mkdir()
    return ["lora", "export", "distilled", "--format", "peft", "--out",
            out / "e.safetensors", "--force"], "not a regular file"


# --- bsa cases ---------------------------------------------------------------------------------

def bak_is_link_out(root, out):
    cfg = json.loads((out / "config.json").read_text())
    cfg["enable_bsa"] = True
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (root / (CFG + ".bak")).symlink_to(out / "config.json")
    return ["bsa", "restore"], "symlink"


def bak_is_fifo(root, out):
    os.mkfifo(root / (CFG + ".bak"))
    return ["bsa", "restore"], "FIFO"


def bak_is_folder(root, out):
    (root / (CFG + ".bak")).mkdir()
    return ["bsa", "restore", "--dry-run"], "folder"


def config_lock_is_link(root, out):
    (root / (CFG + ".lock")).symlink_to(out / "planted.lock")
    return ["bsa", "preset", "720p-fast"], "link"


def config_lock_is_dangling_link_in_checkpoint(root, out):
    (root / (CFG + ".lock")).symlink_to(Path("..") / "planted.lock")
    return ["bsa", "enable"], "link"


def config_lock_is_fifo(root, out):
    os.mkfifo(root / (CFG + ".lock"))
    return ["bsa", "disable"], "lock"


def config_lock_is_folder(root, out):
    (root / (CFG + ".lock")).mkdir()
    return ["bsa", "enable"], "lock"


def config_is_fifo_status(root, out):
    (root / CFG).unlink()
    os.mkfifo(root / CFG)
    return ["bsa", "status"], "FIFO"


def config_is_fifo_enable(root, out):
    (root / CFG).unlink()
    os.mkfifo(root / CFG)
    return ["bsa", "enable"], "FIFO"


def config_is_folder(root, out):
    (root / CFG).unlink()
    (root / CFG).mkdir()
    return ["bsa", "status"], "folder"


def config_links_to_fifo(root, out):
    os.mkfifo(out / "fifo")
    (root / CFG).unlink()
    (root / CFG).symlink_to(out / "fifo")
    return ["bsa", "status"], "outside the checkpoint"


def dit_folder_is_link_out(root, out):
    shutil.move(root / DIT, out / "dit")
    (root / DIT).symlink_to(out / "dit")
    return ["bsa", "preset", "720p-fast"], "outside the checkpoint"


def _config_with(root: Path, raw: str) -> None:
    """Put ``raw`` (JSON text, possibly not strict) in place of the sparsity value."""
    text = (root / CFG).read_text()
    assert '"sparsity": 0.9375' in text
    (root / CFG).write_text(text.replace('"sparsity": 0.9375', f'"sparsity": {raw}'))


def _non_finite(raw: str, command: list[str]) -> Callable:
    def case(root, out):
        _config_with(root, raw)
        return ["bsa", *command], "not finite"
    case.__name__ = f"{raw}-{'-'.join(command)}"
    return case


def nan_in_mlp_ratio(root, out):
    text = (root / CFG).read_text()
    (root / CFG).write_text(text.replace('"mlp_ratio": 4', '"mlp_ratio": NaN'))
    return ["bsa", "enable"], "not finite"


CASES = [
    # class 1: lora
    dir_link_to_dit, dir_link_to_dit_force, dir_link_out_of_checkpoint, file_link_to_shard,
    file_link_to_sentinel, link_inside_adapter_folder, entry_through_link, entry_dotdot,
    entry_absolute, export_entry_through_link, fuse_dir_link, lora_folder_is_link,
    list_lora_folder_is_link, attach_lora_folder_is_link, registry_is_link_out,
    registry_lock_is_link, registry_lock_is_fifo, attach_name_is_link, link_loop,
    # class 1: bsa
    bak_is_link_out, bak_is_fifo, bak_is_folder, config_lock_is_link,
    config_lock_is_dangling_link_in_checkpoint, config_lock_is_fifo, config_lock_is_folder,
    config_is_fifo_status, config_is_fifo_enable, config_is_folder, config_links_to_fifo,
    dit_folder_is_link_out, nan_in_mlp_ratio,
    *(_non_finite(raw, cmd) for raw in ("NaN", "Infinity", "-Infinity", "1e999")
      for cmd in (["enable"], ["status"], ["preset", "720p-fast"])),
    # class 4
    rank_too_large, rank_too_large_dry_run, export_force_onto_shard, export_new_file_into_dit,
    export_force_onto_other_adapter, export_force_onto_vae, export_force_onto_own_source,
    export_new_file_into_lora, export_new_file_into_vae,
    export_force_onto_folder, export_force_onto_link, export_force_onto_non_safetensors,
    export_scratch_is_link, export_peft_config_is_folder,
]


def _run_with_deadline(fn: Callable[[], str], seconds: float = 20.0) -> str:
    """A FIFO that is opened for reading blocks forever: fail the test instead of hanging."""
    result: list[str] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"command hung for over {seconds:.0f} s"
    if errors:
        raise errors[0]
    return result[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_refused_and_nothing_outside_changes(world, capsys, case):
    root, out = world
    args, says = case(root, out)
    lora_links = {p: os.readlink(p) for p in (root / "lora").rglob("*") if p.is_symlink()} \
        if (root / "lora").is_dir() and not (root / "lora").is_symlink() else {}
    before_ckpt = snapshot(root, skip="lora")
    before_out = snapshot(out)
    code = 2 if says == "inside the checkpoint" else 1  # a place no command may write: usage
    line = _run_with_deadline(lambda: refused(capsys, *args, "-m", root, code=code, says=says))
    assert str(root) in line or str(out) in line, line  # names the file the user deals with
    assert snapshot(root, skip="lora") == before_ckpt
    assert snapshot(out) == before_out
    assert not (out / "planted.lock").exists() and not (root / "planted.lock").exists()
    for link, target in lora_links.items():  # nothing deleted, not even the link
        assert link.is_symlink() and os.readlink(link) == target


# --- what must still work beside a hostile entry -------------------------------------------


@pytest.mark.parametrize("plant", [dir_link_to_dit, file_link_to_shard, entry_through_link,
                                   link_inside_adapter_folder, link_loop],
                         ids=lambda c: c.__name__)
def test_list_shows_a_link_out_as_a_problem_row(world, capsys, plant):
    root, out = world
    args, _ = plant(root, out)
    bad = args[2]
    before = snapshot(root, skip="lora")
    capsys.readouterr()
    assert main(["lora", "list", "--json", "-m", str(root)]) == 1  # a check failed
    out = capsys.readouterr()
    rows = {a["name"]: a for a in json.loads(out.out)["adapters"]}
    problems = [n for n, a in rows.items() if a["status"] != "ok"]
    assert out.err.strip().splitlines()[-1] == (
        f"error: {len(problems)} of {len(rows)} adapters have a problem; the first, "
        f"'{problems[0]}': {rows[problems[0]]['status']}")
    assert rows["distilled"]["status"] == "ok" and rows["refinement"]["status"] == "ok"
    assert rows[bad]["format"] is None and rows[bad]["status"] != "ok"
    assert ("outside" in rows[bad]["status"] or "cannot be resolved" in rows[bad]["status"])
    assert main(["lora", "list", "-m", str(root)]) == 1  # the table, one row each
    table = capsys.readouterr().out
    assert sum(line.startswith(f"{bad} ") for line in table.splitlines()) == 1, table
    assert snapshot(root, skip="lora") == before


def test_attach_beside_a_link_out_leaves_it_unregistered(world, capsys):
    root, out = world
    dir_link_to_dit(root, out)
    before = snapshot(root, skip="lora")
    assert main(["lora", "attach", str(_small_lora(out)), "--name", "a", "-m", str(root),
                 "-q"]) == 0
    names = {a["name"] for a in json.loads((root / "lora" / "adapters.json").read_text())
             ["adapters"]}
    assert names == {"a", "distilled", "refinement"}
    assert (root / "lora" / "x").is_symlink() and snapshot(root, skip="lora") == before


def test_detach_of_a_link_inside_lora_removes_the_link_only(world, capsys):
    root, out = world
    assert main(["lora", "attach", str(_small_lora(out)), "--name", "real", "-m", str(root),
                 "-q"]) == 0
    real = root / "lora" / "real"
    files = snapshot(real)
    (root / "lora" / "alias").symlink_to("real")
    assert main(["lora", "detach", "alias", "-m", str(root), "-q"]) == 0
    assert not (root / "lora" / "alias").is_symlink() and snapshot(real) == files
    # an adapter reached through a folder link that has other files: never deleted through it
    (real / "notes.txt").write_text("keep me\n")
    (root / "lora" / "alias").symlink_to("real")
    register_also = json.loads((root / "lora" / "adapters.json").read_text())
    register_also["adapters"].append({**register_also["adapters"][-1], "name": "via",
                                      "file": f"alias/{next(real.glob('*.safetensors')).name}"})
    (root / "lora" / "adapters.json").write_text(json.dumps(register_also))
    files = snapshot(real)
    refused(capsys, "lora", "detach", "via", "-m", root, says="through this link")
    assert snapshot(real) == files and (root / "lora" / "alias").is_symlink()


def test_attach_refuses_a_planted_partial_link_without_following_it(world, capsys):
    root, out = world
    (out / "victim").mkdir()
    (out / "victim" / "keep.txt").write_text("keep\n")
    (root / "lora" / "a.partial").symlink_to(out / "victim")
    refused(capsys, "lora", "attach", _small_lora(out), "--name", "a", "-m", root,
            says="no killed run of longcat-tools left it")
    assert (out / "victim" / "keep.txt").read_text() == "keep\n"
    assert (root / "lora" / "a.partial").is_symlink() and not (root / "lora" / "a").exists()


def test_bsa_keeps_the_documented_config_link_rule(world, capsys):
    """config.json as a link: one out of the checkpoint is refused (not even read); one to a
    file of the checkpoint is read through, replaced by a file, never written through."""
    root, out = world
    (root / CFG).unlink()
    (root / CFG).symlink_to(out / "config.json")
    before = snapshot(out)
    refused(capsys, "bsa", "preset", "720p-fast", "-m", root, says="outside the checkpoint")
    assert snapshot(out) == before and (root / CFG).is_symlink()
    (root / CFG).unlink()
    shutil.copy(out / "config.json", root / "shared.json")
    (root / CFG).symlink_to(root / "shared.json")
    assert main(["bsa", "preset", "720p-fast", "-m", str(root), "-q"]) == 0
    assert snapshot(out) == before and not (root / CFG).is_symlink()
    assert (root / "shared.json").read_text() == (out / "config.json").read_text()
    assert json.loads((root / CFG).read_text())["bsa_params"]["sparsity"] == 0.96875


def test_bsa_writes_strict_json_and_status_never_shows_nan(world, capsys):
    root, out = world
    assert main(["bsa", "enable", "--sparsity", "0.5", "-m", str(root), "-q"]) == 0
    def strict(constant: str) -> None:
        pytest.fail(f"bsa wrote {constant}")

    for name in ("config.json", "config.json.bak"):
        json.loads((root / DIT / name).read_text(), parse_constant=strict)
    assert main(["bsa", "status", "-m", str(root)]) == 0
    shown = capsys.readouterr().out
    assert "nan" not in shown.lower() and "keeps 50%" in shown


# --- links that loop, and a writer that is busy -----------------------------------------------

@pytest.mark.parametrize("command", [
    ["lora", "fuse", "distilled", "--dst", "{fused}", "-m", "{root}"],
    ["verify", "{root}", "-q"],
])
@pytest.mark.parametrize("looped", ["model_index.json", "dit/diffusion_pytorch_model"
                                                        ".safetensors.index.json"])
def test_a_symlink_loop_is_one_line(world, capsys, tmp_path, command, looped):
    """A link that points at itself cannot be resolved: one line naming it, never the catch-all
    or verify's 'unexpected error'."""
    root, _ = world
    victim = root / looped
    victim.unlink()
    victim.symlink_to(victim.name)
    args = [a.format(root=root, fused=tmp_path / "fused") for a in command]
    line = _run_with_deadline(lambda: refused(capsys, *args))
    assert "unexpected error" not in line and victim.name in line
    assert not (tmp_path / "fused").exists()


def test_export_refuses_while_another_export_writes_the_same_file(world, capsys, tmp_path):
    """Two exports to one --out: the second is refused at once (the writer lock), so neither
    can rename the other's half-written scratch file into place."""
    from longcat_tools.io.atomic import writer_lock

    root, _ = world
    out = tmp_path / "out" / "a.safetensors"
    out.parent.mkdir()
    with writer_lock(out):
        refused(capsys, "lora", "export", "distilled", "--format", "peft", "--out", out,
                "-m", root, says="another process is writing it")
    assert not out.exists()
    assert main(["lora", "export", "distilled", "--format", "peft", "--out", str(out), "-m",
                 str(root), "-q"]) == 0
    assert out.is_file() and not list(out.parent.glob(".*lock"))
