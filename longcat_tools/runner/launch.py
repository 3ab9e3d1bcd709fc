"""``run --gpus N``: start the N processes of a context-parallel job (one video) or of a
data-parallel matrix run (whole videos per process) on this machine.

Each process is ``python -m longcat_tools run ... --cp N`` with the environment torchrun gives its
workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the same
job also runs under ``torchrun --nproc-per-node N -m longcat_tools run ... --cp N``. We start
them ourselves rather than through torchrun's elastic agent so that a failing rank ends the job
with its own one-line error instead of the agent's report, and the others are stopped at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from longcat_tools.errors import UsageError

# Seconds a process told to stop (SIGTERM, or Ctrl-C) gets to clean up before it is killed: one
# blocked in a collective with a rank that died would never return to take the signal.
STOP_GRACE_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_gpus(n: int, device: str) -> None:
    """``--gpus n`` starts a process a GPU: refuse where this machine has fewer (each rank
    would fail on its own device, or run on the CPU without a word). ``--device cpu`` asks
    for n CPU processes."""
    if device == "cpu":
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise UsageError(f"--gpus {n}: no CUDA GPU here (--device cpu runs {n} CPU processes)")
    if have < n:
        fix = "run without --gpus" if have == 1 else f"use --gpus {have} or fewer"
        raise UsageError(f"--gpus {n}: this machine has {have} CUDA GPU"
                         f"{'s' if have > 1 else ''} ({fix})")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def without_option(args: list[str], name: str) -> list[str]:
    """``args`` minus every ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def launch(n: int, args: list[str], role: str = "--cp") -> int:
    """Run ``longcat_tools`` with ``args`` (``role n`` appended: ``--cp n`` for context
    parallel, ``--data-parallel n`` for a matrix split by videos) in ``n`` processes; the exit
    code is the first failure's, or 0. A data-parallel worker's stdout goes to stderr: the
    launcher prints the run's one result (``--json``: the manifest), a context-parallel job's
    first rank its video's."""
    port = _free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)}
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    cmd = [sys.executable, "-m", "longcat_tools", *args, role, str(n)]
    stdout = 2 if role == "--data-parallel" and _is_open(2) else None
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=stdout) for r in range(n)]
    code = 0
    stop_by = None  # after a failure: when the others still running are killed
    try:
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc and not code:
                    code = rc
                    for other in procs:
                        other.send_signal(signal.SIGTERM)
                    stop_by = time.monotonic() + STOP_GRACE_S
            if stop_by is not None and time.monotonic() > stop_by:
                for p in procs:  # stuck in a collective with the failed rank
                    p.kill()
            time.sleep(0.05)
    except BaseException as e:  # Ctrl-C, or SIGTERM (the CLI's Terminated): the same to them
        sig = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        for p in procs:
            p.send_signal(sig)
        stop_by = time.monotonic() + STOP_GRACE_S  # one grace for all, not one each
        for p in procs:
            try:
                p.wait(max(0.0, stop_by - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        raise
    return code if code >= 0 else 128 - code
