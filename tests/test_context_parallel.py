"""Context parallel on CPU with gloo, 2 processes: the split DiT forward and whole runs equal the
single-process results (fp32, < 1e-5 relative); bad splits fail with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_tools.cli import main
from longcat_tools.runner.launch import without_option

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--height", "32", "--width", "32", "--frames", "9", "--steps", "2"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def split_results(tiny_native, tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "split.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(TESTS / "cp_worker.py"), str(tiny_native), str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


@pytest.mark.parametrize("case", ["uneven_split", "condition_frames", "block_sparse",
                                  "kv_cache"])
def test_split_dit_forward_equals_one_process(tiny_native, split_results, case):
    from cp_worker import CASES

    from longcat_tools.runner.loading import load_transformer

    dit = load_transformer(tiny_native, device="cpu", dtype="fp32")
    with torch.no_grad():
        ref = CASES[case](dit)
    assert split_results[case].shape == ref.shape
    assert rel(split_results[case], ref) < 1e-5


def _latents(path: Path) -> torch.Tensor:
    return load_file(path)["latents"]


def test_two_step_t2v_over_two_processes_equals_one(tiny_native, tmp_path, capsys):
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    args = ["-m", str(tiny_native), "--task", "t2v", "-p", "a cat", *TINY, "--device", "cpu"]
    assert main(["run", "-q", *args, "--out", str(one), "--save-latents",
                 str(tmp_path / "one.safetensors")]) == 0
    cmd = [sys.executable, "-m", "longcat_tools", "run", "-q", *args, "--out", str(two),
           "--save-latents", str(tmp_path / "two.safetensors"), "--gpus", "2"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and "error" not in proc.stderr
    assert rel(_latents(tmp_path / "two.safetensors"),
               _latents(tmp_path / "one.safetensors")) < 1e-5
    assert two.is_file() and (tmp_path / "two.mp4.json").is_file()


def test_video_continuation_under_torchrun_equals_one_process(tiny_native, tmp_path):
    """vc with the KV cache, started by torchrun directly (text broadcast, VAE on rank 0)."""
    src = tmp_path / "src.mp4"
    base = ["-m", str(tiny_native), "--device", "cpu", "-p", "a cat"]
    assert main(["run", "-q", *base, "--task", "t2v", *TINY, "--out", str(src)]) == 0
    vc = [*base, "--task", "vc", "--video", str(src), "--cond-frames", "5", "--frames", "13",
          "--height", "32", "--width", "32", "--steps", "2"]
    assert main(["run", "-q", *vc, "--out", str(tmp_path / "one.mp4"), "--save-latents",
                 str(tmp_path / "one.safetensors")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "longcat_tools", "run", "-q", *vc, "--out", str(tmp_path / "two.mp4"),
           "--save-latents", str(tmp_path / "two.safetensors"), "--cp", "2"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rel(_latents(tmp_path / "two.safetensors"),
               _latents(tmp_path / "one.safetensors")) < 1e-5


def test_cp_without_its_processes_is_one_line(tiny_native, tmp_path, capsys):
    rc = main(["run", "-m", str(tiny_native), "--device", "cpu", *TINY, "--cp", "2",
               "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--cp 2 needs 2 processes" in err and "torchrun --nproc-per-node 2" in err


def test_too_few_frames_for_the_split_is_one_line(tiny_native, tmp_path):
    """1 latent frame cannot be split over 2 ranks: a clear error, not a wrong answer or hang."""
    base = [sys.executable, "-m", "longcat_tools", "run", "-m", str(tiny_native), "--device",
            "cpu", "--height", "32", "--width", "32", "--steps", "1", "--out",
            str(tmp_path / "x.mp4")]
    checked_first = subprocess.run([*base, "--frames", "1", "--gpus", "2"], env=ENV,
                                   capture_output=True, text=True, timeout=300)
    assert checked_first.returncode == 2, checked_first.stderr
    assert checked_first.stderr.strip().splitlines() == [
        "error: --frames 1: 1 latent frames cannot be split over 2 processes (use at least 5 "
        "frames, or fewer GPUs)"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "longcat_tools", "run", "-q", *base[4:], "--frames", "1", "--cp", "2"]
    in_ranks = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert in_ranks.returncode != 0
    assert "error: --frames 1: 1 latent frames cannot be split" in in_ranks.stderr
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("have,says", [
    (0, "error: --gpus 2: no CUDA GPU here (--device cpu runs 2 CPU processes)"),
    (1, "error: --gpus 2: this machine has 1 CUDA GPU (run without --gpus)")])
@pytest.mark.parametrize("matrix", [False, True])
def test_gpus_beyond_the_machine_are_refused_before_launch(tiny_native, tmp_path, capsys,
                                                           monkeypatch, have, says, matrix):
    """``--gpus 2`` with --device auto on a machine without a GPU ran two CPU processes without
    a word; with one GPU, the second rank would have failed on a device it does not have."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: have > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: have)
    many = ["--seeds", "1,2", "--out-dir", str(tmp_path / "o")] if matrix else [
        "--out", str(tmp_path / "x.mp4")]
    assert main(["run", "-q", "-m", str(tiny_native), "--height", "32", "--width", "32",
                 "--frames", "9", "--steps", "1", "--gpus", "2", *many]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [says]
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "o").exists()


def test_gpus_the_heads_do_not_split_over_is_refused_before_launch(tiny_native, tmp_path,
                                                                   capsys):
    """Checked after loading in every rank, it printed the same line three times."""
    from longcat_tools.cli import main

    assert main(["run", "-q", "-m", str(tiny_native), "--device", "cpu", "--height", "32",
                 "--width", "32", "--frames", "9", "--steps", "1", "--gpus", "3", "--out",
                 str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --cp/--gpus 3: the DiT's 2 heads do not split evenly over that many "
                   "processes (use a divisor)"]


def test_a_split_the_model_cannot_take_is_one_line(tiny_native):
    from longcat_tools.runner.context_parallel import ContextParallel, FrameSplit

    class Three(ContextParallel):  # a group of 3 without a process group: only checks run
        def __init__(self) -> None:
            self.group, self.rank, self.size, self._root = None, 1, 3, 0

    from longcat_tools.errors import LongcatError
    from longcat_tools.runner.loading import load_transformer

    dit = load_transformer(tiny_native)  # 2 heads
    with pytest.raises(LongcatError, match="2 heads must divide evenly"):
        dit.enable_context_parallel(Three())
    assert Three().split((7, 2, 3)) == FrameSplit(3, 2, (18, 12, 12))
    with pytest.raises(LongcatError, match="needs at least 3 latent frames"):
        Three().split((2, 4, 4))


def test_gpus_option_is_removed_before_relaunch():
    assert without_option(["run", "--gpus", "2", "-q", "--gpus=4", "--steps", "2"], "--gpus") \
        == ["run", "-q", "--steps", "2"]


def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace(monkeypatch):
    """After one rank failed, the others got SIGTERM; a worker now unwinds on it, which one
    blocked in a collective with the dead rank never does: the launcher kills it after a grace
    instead of waiting for the collective's timeout."""
    from longcat_tools.runner import launch

    class Proc:
        def __init__(self, rc):
            self.rc, self.got = rc, []

        def poll(self):
            return self.rc

        def send_signal(self, sig):
            self.got.append(sig)

        def kill(self):
            self.got.append("kill")
            self.rc = -9

    procs = iter([Proc(1), Proc(None)])
    made = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: made.append(next(procs))
                        or made[-1])
    monkeypatch.setattr(launch, "STOP_GRACE_S", 0.2)
    assert launch.launch(2, ["run"]) == 1
    assert made[1].got == [launch.signal.SIGTERM, "kill"]


def test_ranks_told_to_stop_share_one_grace(monkeypatch):
    """Each rank that ignored the signal got a grace of its own: 8 stuck ranks took 80 s."""
    import time

    from longcat_tools.runner import launch

    class Stuck:
        def __init__(self):
            self.killed = False

        def poll(self):
            raise KeyboardInterrupt  # Ctrl-C while the launcher waits

        def send_signal(self, sig):
            pass

        def wait(self, timeout=None):
            if not self.killed:
                time.sleep(timeout)
                raise launch.subprocess.TimeoutExpired("rank", timeout)

        def kill(self):
            self.killed = True

    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: Stuck())
    monkeypatch.setattr(launch, "STOP_GRACE_S", 0.3)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch.launch(4, ["run"])
    assert time.monotonic() - t0 < 0.6
