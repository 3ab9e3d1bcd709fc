"""Hostile corpus, class 1 (data loss, writes outside the output): concurrent writers to one
destination, SIGKILL at random points, and the one ``--force`` rule of convert, synth and fuse.

Writers run as child processes (``python -c CHILD``) so that they can be stopped and killed for
real: ``HOSTILE_PAUSE=1`` makes a child SIGSTOP itself once its output is staged (lock held,
``DST.partial`` full, not yet renamed); ``HOSTILE_ROOT`` + ``HOSTILE_KILL_AT=k`` SIGKILLs it just
before its k-th change to a file or folder under ROOT (seen through Python's audit hooks: opens
for writing, renames, removals, mkdirs, links, copies, plus foreign calls such as
``renameat2``), and ``HOSTILE_COUNT=FILE`` lists the events of those changes in a clean run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hostile import refused

from longcat_tools import convert as conv
from longcat_tools.cli import main
from longcat_tools.io.atomic import lock_path, partial_path

KILLED = -signal.SIGKILL
BUSY = "another process is writing it"

CHILD = r"""
import atexit, os, signal, sys
from contextlib import contextmanager

if os.environ.get("HOSTILE_PAUSE"):
    from longcat_tools import convert, synth
    from longcat_tools.io import atomic
    from longcat_tools.lora import fusion

    @contextmanager
    def paused(*args, **kwargs):
        with atomic.atomic_folder(*args, **kwargs) as tmp:
            yield tmp
            os.kill(os.getpid(), signal.SIGSTOP)

    for module in (convert, synth, fusion):
        module.atomic_folder = paused

root = os.environ.get("HOSTILE_ROOT")
if root:
    kill_at = int(os.environ.get("HOSTILE_KILL_AT", "0"))
    seen = []
    PATH_ARG = {"os.rename": 1, "os.link": 1, "shutil.copyfile": 1, "os.remove": 0,
                "os.rmdir": 0, "os.mkdir": 0, "shutil.rmtree": 0, "os.chmod": 0,
                "os.truncate": 0, "os.symlink": 1}

    def target(event, args):
        if event == "open":
            path, mode, flags = args
            if mode is not None and not any(c in mode for c in "wax+"):
                return None
            if mode is None and not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                return None
            return path
        if event in PATH_ARG:
            return args[PATH_ARG[event]]
        return None

    def hook(event, args):
        path = target(event, args)
        if path is None or isinstance(path, int):
            return
        if not os.path.abspath(os.fsdecode(path)).startswith(root):
            return
        seen.append(event)
        if len(seen) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    count = os.environ.get("HOSTILE_COUNT")
    if count:
        atexit.register(lambda: open(count, "w").write("\n".join(seen)))

from longcat_tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _child(args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)],
                            env={**os.environ, **{k: str(v) for k, v in env.items()}},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args, **env) -> subprocess.CompletedProcess:
    p = _child(args, **env)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _paused(args) -> subprocess.Popen:
    """A writer stopped with its output staged and its lock held."""
    p = _child(args, HOSTILE_PAUSE=1)
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        p.returncode = os.waitstatus_to_exitcode(status)
        pytest.fail(f"the writer ended before pausing ({p.returncode}): {p.stderr.read()}")
    return p


def _resume(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err


def _deep_ok(path) -> bool:
    return main(["verify", str(path), "--deep", "-q"]) == 0


MARKER = "scheduler/marker.txt"  # an old output's own file: inside a part (--force refuses yours)


def _leftovers(dst) -> list[str]:
    """Scratch, lock or replaced folders a finished writer must not leave beside DST."""
    return sorted(p.name for p in dst.parent.iterdir()
                  if p.name.startswith(f".{dst.name}.") or p.name == partial_path(dst).name)


def _events(args, root, tmp_path) -> list[str]:
    """The audit events of a clean run's changes under ``root``, in order."""
    counter = tmp_path / "events.txt"
    p = _run(args, HOSTILE_ROOT=root, HOSTILE_COUNT=counter)
    assert p.returncode == 0, p.stderr
    return counter.read_text().split("\n")


def _count(args, root, tmp_path) -> int:
    return len(_events(args, root, tmp_path))


@pytest.fixture(scope="module")
def converted(tiny_native, tmp_path_factory):
    dst = tmp_path_factory.mktemp("hw") / "fv"
    conv.convert(tiny_native, dst)
    return dst


@pytest.fixture(scope="module")
def fuse_src(tiny_native, tmp_path_factory):
    """A native checkpoint the fuse tests read (never change)."""
    src = tmp_path_factory.mktemp("hw") / "src"
    shutil.copytree(tiny_native, src)
    return src


def _convert_args(src, dst, *extra):
    return ["convert", "--src", src, "--dst", dst, "-q", *extra]


def _fuse_args(src, dst, *extra):
    return ["lora", "fuse", "distilled:0.5", "--dst", dst, "-m", src, "-q", *extra]


# ---------------------------------------------------------------------------------------------
# two writers, one destination


@pytest.mark.parametrize("command", ["convert", "fuse", "synth"])
def test_second_writer_is_refused_and_the_first_finishes(command, tiny_native, fuse_src,
                                                         tmp_path, capsys):
    """The first writer is stopped with everything staged; a second one (with or without
    --force) is refused at once with one line naming DST, and leaves the first one's staging
    alone; the first then finishes into a checkpoint that passes verify --deep."""
    dst = tmp_path / "out"
    args = {"convert": _convert_args(tiny_native, dst), "fuse": _fuse_args(fuse_src, dst),
            "synth": ["synth", dst, "-q"]}[command]
    first = _paused(args)
    try:
        staged = sorted(p.relative_to(partial_path(dst))
                        for p in partial_path(dst).rglob("*"))
        assert staged and lock_path(dst).is_file()
        t0 = time.monotonic()
        for extra in ([], ["--force"]):
            line = refused(capsys, *args, *extra, says=BUSY)
            assert str(dst) in line
        assert time.monotonic() - t0 < 10  # refused, not queued
        assert sorted(p.relative_to(partial_path(dst))
                      for p in partial_path(dst).rglob("*")) == staged
        assert not dst.exists()
    finally:
        _resume(first)
    assert _deep_ok(dst)
    assert _leftovers(dst) == []


def test_convert_racing_a_bsa_edit_of_its_source(tiny_native, tmp_path, capsys):
    """`bsa enable/disable` on the source while convert runs: the output holds the config as
    it was when convert read it (old or new, never a mix) and passes verify --deep. Once with
    the edit landing while convert is stopped, once with edits in a loop for the whole run."""
    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    before = json.loads((src / "dit" / "config.json").read_text())
    assert before["enable_bsa"] is False
    dst = tmp_path / "paused"
    first = _paused(_convert_args(src, dst))
    try:
        assert main(["bsa", "enable", "-m", str(src), "-q"]) == 0
    finally:
        _resume(first)
    out = json.loads((dst / "transformer" / "config.json").read_text())
    assert out["enable_bsa"] is False and _deep_ok(dst)

    dst = tmp_path / "loop"
    p = _child(_convert_args(src, dst))
    edits = 0
    while p.poll() is None:
        assert main(["bsa", "disable" if edits % 2 else "enable", "-m", str(src), "-q"]) == 0
        edits += 1
    assert p.returncode == 0, p.stderr.read()
    out = json.loads((dst / "transformer" / "config.json").read_text())
    assert out["enable_bsa"] in (True, False) and edits > 0
    assert {k: v for k, v in out.items() if k != "enable_bsa"} == {
        k: v for k, v in json.loads((tmp_path / "paused" / "transformer" / "config.json")
                                    .read_text()).items() if k != "enable_bsa"}
    assert _deep_ok(dst)
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# SIGKILL at random points, then the same command again


def _kill_points(n: int, seeds: tuple[int, ...]) -> list[int]:
    """Seeded points in [1, n]."""
    return sorted({random.Random(s).randint(1, n) for s in seeds})


@pytest.mark.parametrize("command", ["convert", "fuse"])
def test_sigkill_anywhere_then_rerun(command, tiny_native, fuse_src, converted, tmp_path):
    """--force over an old checkpoint (or into a fresh DST), killed at seeded points and right
    after the one-step swap: DST is absent or complete (old or new, never a mix); the same
    command again exits 0, its output passes verify --deep, and nothing is left beside it."""
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "out"
    args = (_convert_args(tiny_native, dst, "--force") if command == "convert"
            else _fuse_args(fuse_src, dst, "--force"))

    def old_dst():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(converted, dst)
        (dst / MARKER).write_text("old")

    old_dst()
    events = _events(args, work, tmp_path)
    # the old checkpoint's removal, once swapped out (1-based)
    cleanup = len(events) - events[::-1].index("shutil.rmtree")
    for i, k in enumerate([*_kill_points(cleanup - 1, (1, 2)), cleanup]):
        old_dst()
        if i % 2 == 0 and k < cleanup:
            shutil.rmtree(dst)  # a first write
        p = _run(args, HOSTILE_ROOT=work, HOSTILE_KILL_AT=k)
        assert p.returncode == KILLED, (k, cleanup, p.stderr[-400:])
        if k == cleanup:  # swapped, the old one not yet deleted
            assert (partial_path(dst) / MARKER).read_text() == "old"
            assert not (dst / MARKER).exists()
        if dst.exists():
            assert _deep_ok(dst), (k, cleanup)
        assert main([str(a) for a in args]) == 0, (k, cleanup)
        assert _deep_ok(dst) and not (dst / MARKER).exists(), (k, cleanup)
        assert _leftovers(dst) == [], (k, cleanup)


def _bsa_kill(converted, tmp_path, points):
    """Kill `bsa enable` at each of ``points(events)`` on a fresh copy of a checkpoint with a
    checksum list: the config parses and is the old or the new one; `bsa enable` again exits 0
    and verify --deep passes."""
    ckpt = tmp_path / "ckpt"
    cfg = ckpt / "transformer" / "config.json"
    args = ["bsa", "enable", "-m", ckpt, "-q"]
    shutil.copytree(converted, ckpt)
    old = cfg.read_text()
    events = _events(args, ckpt, tmp_path)
    new = cfg.read_text()
    assert json.loads(old)["enable_bsa"] is False and json.loads(new)["enable_bsa"] is True
    for k in points(events):
        shutil.rmtree(ckpt)
        shutil.copytree(converted, ckpt)
        p = _run(args, HOSTILE_ROOT=ckpt, HOSTILE_KILL_AT=k)
        assert p.returncode == KILLED, (k, events, p.stderr[-400:])
        assert cfg.read_text() in (old, new), k
        assert main([str(a) for a in args]) == 0, k
        assert cfg.read_text() == new and _deep_ok(ckpt), (k, events)


def test_sigkill_of_bsa_enable_then_rerun(converted, tmp_path):
    _bsa_kill(converted, tmp_path, lambda events: _kill_points(len(events), (1, 2, 3, 4)))


def test_bsa_killed_between_its_config_and_checksum_list(converted, tmp_path):
    """The config is renamed into place (backup first, then the config), the checksum list
    after: killed in between, the rerun must still leave a list that matches."""
    def after_config_rename(events):
        renames = [i for i, e in enumerate(events, 1) if e == "os.rename"]
        return [renames[1] + 1]

    _bsa_kill(converted, tmp_path, after_config_rename)


# ---------------------------------------------------------------------------------------------
# --force replaces only a checkpoint, never through a link, never the source


def _targets(tmp_path, converted):
    """name -> (path, a snapshot to compare after)."""
    regular = tmp_path / "file.bin"
    regular.write_bytes(b"not a checkpoint")
    unrelated = tmp_path / "docs"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("years of work")
    link = tmp_path / "link"
    link.symlink_to(converted, target_is_directory=True)
    return {"regular file": regular, "unrelated folder": unrelated, "symlink": link}


def _snapshot(path):
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return ("file", path.read_bytes())
    return ("dir", sorted((p.name, p.read_bytes()) for p in path.iterdir()))


@pytest.mark.parametrize("command", ["convert", "fuse", "synth"])
def test_force_refuses_what_is_not_a_checkpoint(command, tiny_native, fuse_src, converted,
                                                tmp_path, capsys):
    says = {"regular file": "is not a folder", "unrelated folder": "does not look like a "
            "checkpoint", "symlink": "is a symbolic link"}
    cases = _targets(tmp_path, converted)
    before = {name: _snapshot(p) for name, p in cases.items()}
    for name, dst in cases.items():
        args = {"convert": _convert_args(tiny_native, dst, "--force"),
                "fuse": _fuse_args(fuse_src, dst, "--force"),
                "synth": ["synth", dst, "--force", "-q"]}[command]
        refused(capsys, *args, says=says[name])
        assert _snapshot(dst) == before[name], name
        assert _leftovers(dst) == [], name
    assert _deep_ok(converted)
    if command != "synth":  # the source itself, and a folder holding it
        src = tiny_native if command == "convert" else fuse_src
        for dst, says in ((src, "inside the source"), (src.parent, "contain the source")):
            args = (_convert_args(src, dst, "--force") if command == "convert"
                    else _fuse_args(src, dst, "--force"))
            refused(capsys, *args, code=2, says=says)
        assert _deep_ok(src)


@pytest.mark.parametrize("command", ["convert", "fuse", "synth"])
def test_force_refuses_a_checkpoint_holding_files_of_yours(command, tiny_native, fuse_src,
                                                           tmp_path, capsys):
    """convert --force and lora fuse --force emptied a previous output with the user's notes
    and renders beside the weights, where synth --force refused."""
    args = {"convert": lambda d: _convert_args(tiny_native, d, "--force"),
            "fuse": lambda d: _fuse_args(fuse_src, d, "--force"),
            "synth": lambda d: ["synth", d, "--force", "-q"]}[command]
    dst = tmp_path / "out"
    assert main([str(a) for a in args(dst)]) == 0
    assert main([str(a) for a in args(dst)]) == 0  # its own output: replaced
    (dst / "renders").mkdir()
    (dst / "renders" / "a.mp4").write_bytes(b"mine")
    before = _snapshot(dst / "renders")
    refused(capsys, *args(dst), says="holds renders, which this run does not write")
    assert _snapshot(dst / "renders") == before
    assert _leftovers(dst) == []


@pytest.mark.parametrize("command", ["convert", "fuse", "synth"])
def test_a_new_checkpoint_inside_another_is_refused(command, tiny_native, fuse_src, converted,
                                                    capsys):
    """Written into another checkpoint (its lora/, say), a new one would be read as its files."""
    for dst in (converted / "lora" / "new", converted / "new"):
        args = {"convert": _convert_args(tiny_native, dst),
                "fuse": _fuse_args(fuse_src, dst),
                "synth": ["synth", dst, "-q"]}[command]
        refused(capsys, *args, code=2, says=f"inside the checkpoint {converted.resolve()}")
        assert not dst.exists() and _leftovers(dst) == []
    assert _deep_ok(converted)


def test_only_a_folder_with_a_dit_config_counts_as_a_checkpoint_above(tmp_path, capsys):
    """A workspace that happens to hold a `transformer/` or `dit/` folder or a stray
    model_index.json is no checkpoint: outputs below it are written."""
    home = tmp_path / "home"
    for name in ("transformer", "dit", "work"):
        (home / name).mkdir(parents=True)
    (home / "model_index.json").write_text("{}")
    assert main(["synth", str(home / "work" / "new"), "-q"]) == 0
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    refused(capsys, "synth", loop / "new", "-q", code=2, says="parent folder does not exist")


# ---------------------------------------------------------------------------------------------
# the lock file and the scratch folder are never followed


def test_lock_file_that_is_a_link_or_a_fifo_is_refused(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "out"
    lock_path(dst).symlink_to(outside / "created")
    refused(capsys, "synth", dst, "-q", says="is a symbolic link")
    assert list(outside.iterdir()) == [] and not dst.exists()
    lock_path(dst).unlink()
    os.mkfifo(lock_path(dst))
    refused(capsys, "synth", dst, "-q", says="not a regular file")
    lock_path(dst).unlink()
    assert main(["synth", str(dst), "-q"]) == 0 and _leftovers(dst) == []


def test_a_partial_link_is_never_followed_and_removed_only_after_a_killed_run(tmp_path,
                                                                              capsys):
    """No run of ours makes a link at ``DST.partial``: without a killed run's lock file it is
    the user's, refused as a folder of that name is (it was deleted without a word)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    dst = tmp_path / "out"
    partial_path(dst).symlink_to(outside, target_is_directory=True)
    refused(capsys, "synth", dst, "-q", says="no killed run of longcat-tools left it")
    assert partial_path(dst).is_symlink() and not dst.exists()
    lock_path(dst).write_text("")  # as a killed run leaves it
    assert main(["synth", str(dst), "-q"]) == 0
    assert (outside / "keep.txt").read_text() == "mine" and _leftovers(dst) == []
    assert _deep_ok(dst)


def test_sigterm_mid_write_leaves_nothing_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """SIGTERM (CI cancelling a job, docker stop) killed a writer outright: DST.partial and the
    lock file stayed, where Ctrl-C removed both."""
    import longcat_tools.synth

    dst = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)

    def terminated_while_writing(folder, *_a, **_k):
        (folder / "half").write_text("written")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, in the main thread

    monkeypatch.setattr(longcat_tools.synth, "write_native", terminated_while_writing)
    assert main(["synth", str(dst), "--json"]) == 143
    out = capsys.readouterr()
    assert json.loads(out.out) == {"error": "terminated", "exit_code": 143}
    assert out.err.strip() == "terminated"
    assert not dst.exists() and _leftovers(dst) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_main_in_a_thread_leaves_signals_alone(tmp_path, capsys):
    """Outside the main thread every error was chained to 'signal only works in main thread'."""
    import threading

    rcs = []
    t = threading.Thread(target=lambda: rcs.append(main(["synth", str(tmp_path / "no" / "x"),
                                                         "-v"])))
    t.start()
    t.join()
    assert rcs == [2]
    assert "signal only works" not in capsys.readouterr().err


def test_a_second_ctrl_c_during_the_clean_up_keeps_the_lock_file(tmp_path, monkeypatch):
    """Interrupted while deleting its scratch folder, a run removed its lock file anyway: the
    next run took DST.partial for the user's and refused to start."""
    from longcat_tools.io import atomic

    dst = tmp_path / "out"

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_folder(dst) as tmp:
            (tmp / "half").write_text("written")
            monkeypatch.setattr(atomic.shutil, "rmtree", interrupted)
            raise KeyboardInterrupt  # the first Ctrl-C; the second lands in the clean-up
    monkeypatch.undo()
    assert partial_path(dst).is_dir() and lock_path(dst).exists()
    assert main(["synth", str(dst), "-q"]) == 0
    assert _leftovers(dst) == [] and _deep_ok(dst)


def test_a_scratch_name_the_user_made_is_refused_not_deleted(tiny_native, tmp_path, capsys):
    """``DST.partial`` is removed only where a killed run left it, which its lock file beside
    ``DST`` shows; a folder or file of that name made otherwise is the user's."""
    dst = tmp_path / "out"
    (partial_path(dst) / "sub").mkdir(parents=True)
    (partial_path(dst) / "sub" / "keep").write_text("mine")
    for args in (["synth", dst], ["convert", "--src", tiny_native, "--dst", dst]):
        refused(capsys, *args, "-q", says="no killed run of longcat-tools left it")
        assert (partial_path(dst) / "sub" / "keep").read_text() == "mine" and not dst.exists()
    out = tmp_path / "x.safetensors"
    partial_path(out).write_text("mine")
    refused(capsys, "lora", "export", "distilled", "--format", "native", "--out", out, "-m",
            tiny_native, "-q", says="no killed run of longcat-tools left it")
    assert partial_path(out).read_text() == "mine"
    lock_path(dst).touch()  # as a run killed while writing dst leaves it
    assert main(["synth", str(dst), "-q"]) == 0
    assert not partial_path(dst).exists() and _deep_ok(dst)


@pytest.mark.parametrize("dst", ["", ".", "{ckpt}/lora/.."])
def test_an_output_that_names_no_entry_of_its_own_is_refused(dst, tiny_native, tmp_path,
                                                             monkeypatch, capsys):
    """'..' or '.' as DST would put the scratch folder ``DST.partial`` beside the current
    folder or inside another checkpoint."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_native, ckpt)
    dst = dst.format(ckpt=ckpt)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args in (["synth", dst, "--force"], ["convert", "--src", tiny_native, "--dst", dst,
                                             "--force"],
                 ["lora", "fuse", "distilled", "-m", tiny_native, "--dst", dst, "--force"]):
        refused(capsys, *args, "-q", code=2,
                says="an empty path" if dst == "" else "name the output itself")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("command", [["convert", "--copy"], ["convert"],
                                     ["lora", "fuse", "distilled"]])
def test_a_truncated_component_is_not_carried_into_a_new_checkpoint(tiny_native, tmp_path,
                                                                     capsys, command):
    """A VAE cut to 2,000 bytes was copied (or linked) into the output, exit 0, and verify
    failed the result; a truncated DiT shard was already refused."""
    from longcat_tools.cli import main

    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    vae = src / "vae" / "diffusion_pytorch_model.safetensors"
    os.truncate(vae, 2000)
    dst = tmp_path / "dst"
    args = ([*command, "--src", str(src)] if command[0] == "convert"
            else [*command, "-m", str(src)])
    assert main([*args, "--dst", str(dst), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(vae) in err[0] and "truncated" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_output_that_is_a_dangling_link_is_named_as_a_link(tiny_native, tmp_path, capsys):
    """``lora export --out`` onto a link to nothing said "already exists (pass --force)", and
    --force would not have replaced it either."""
    link = tmp_path / "out.safetensors"
    link.symlink_to(tmp_path / "gone.safetensors")
    refused(capsys, "lora", "export", "distilled", "-m", tiny_native, "--format", "peft",
            "--out", link, says=f"is a symbolic link (to {tmp_path / 'gone.safetensors'})")
    assert link.is_symlink() and not (tmp_path / "gone.safetensors").exists()


def _unreadable(monkeypatch, path):
    """``path`` cannot be opened, as a ``chmod 000`` file for a user who is not root."""
    real_open = os.open

    def deny(name, flags, *args, **kwargs):
        if os.path.abspath(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, flags, *args, **kwargs)

    if os.geteuid() == 0:  # root reads a 000 file: deny it here instead
        monkeypatch.setattr(os, "open", deny)
    path.chmod(0)


@pytest.mark.parametrize("command", [["convert", "--copy"], ["convert"],
                                     ["lora", "fuse", "distilled"]])
@pytest.mark.parametrize("fault, says", [
    ("fifo", "not a regular file (a FIFO"),
    ("not utf-8", "cannot be listed in checksums.sha256 (bytes in its name that are not UTF-8)"),
    ("unreadable", "cannot read (Permission denied)"),
])
def test_a_component_file_that_cannot_be_carried_is_refused_while_planning(
        tiny_native, tmp_path, capsys, monkeypatch, command, fault, says):
    """A FIFO hung convert's final fsync (lock and scratch folder left behind); a file it could
    not read, or whose name the checksums cannot list, was an internal error half way."""
    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    path = src / "tokenizer" / ("\udcff.txt" if fault == "not utf-8" else "extra.txt")
    if fault == "fifo":
        os.mkfifo(path)
    else:
        path.write_text("x")
    if fault == "unreadable":
        _unreadable(monkeypatch, path)
    dst = tmp_path / "dst"
    args = ([*command, "--src", src] if command[0] == "convert" else [*command, "-m", src])
    line = refused(capsys, *args, "--dst", dst, "-q", says=says)
    assert str(path).encode("utf-8", "backslashreplace").decode() in line  # \udcff: printable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_refuses_an_adapter_it_cannot_read_instead_of_dropping_it(tiny_native, tmp_path,
                                                                         capsys):
    """A broken link in lora/ was left out of the output, exit 0, while `lora list` named the
    adapter missing; left out with --lora naming the others, it is not read."""
    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    (src / "lora" / "dang.safetensors").symlink_to("gone.safetensors")
    refused(capsys, "convert", "--src", src, "--dst", tmp_path / "dst", "-q",
            says="dang.safetensors: a broken symlink (to gone.safetensors)")
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "dst"), "-q",
                 "--lora", "distilled"]) == 0


def test_a_linked_checksum_list_is_refused_before_bsa_or_lora_change_anything(
        converted, tmp_path, capsys):
    """bsa and lora read checksums.sha256 through a link leading out of the checkpoint, then
    replaced the link with a file holding what it pointed at."""
    ckpt = tmp_path / "c"
    shutil.copytree(converted, ckpt, symlinks=True)
    outside = tmp_path / "sums"
    (ckpt / "checksums.sha256").rename(outside)
    (ckpt / "checksums.sha256").symlink_to(outside)
    config = ckpt / "transformer" / "config.json"
    before = config.read_text()
    for args in (["bsa", "preset", "720p-fast", "-m", ckpt],
                 ["lora", "detach", "distilled", "-m", ckpt]):
        refused(capsys, *args, says="the checksum list is a symlink")
    assert (ckpt / "checksums.sha256").is_symlink() and config.read_text() == before
