"""End to end: the original pipeline and ``longcat-tools run`` on the same checkpoint, one GPU.

The task is t2v distilled at 480p: 832x480, 93 frames, 16 steps, guidance 1, the cfg_step LoRA.

Each run is a fresh process:
- **original**: the original ``LongCatVideoPipeline``, loaded the way its t2v demo loads it:
  components through ``from_pretrained``, ``pipe.to(cuda)``, the LoRA through ``dit.load_lora``
  and ``enable_loras``, then ``generate_t2v(use_distill=True)``.
  - It is imported from the checkout given with ``--original``, a scratch copy that is never
    committed here.
  - Its dense attention goes through a ``flash_attn`` stand-in on cuDNN SDPA (see
    ``vs_original.py``).
- **ours**: ``longcat-tools run --task t2v --distill`` through the CLI, as users run it, once per
  ``--ours`` setting:
  - `bf16`;
  - `fp8` (``--precision fp8``: the GEMMs in e4m3 and, by default, dense attention by cuDNN's
    fp8 kernel where NVIDIA's frontend is installed, else ours);
  - `fp8+te` (also ``--offload text-encoder``);
  - `fp8-bf16attn` (``--fp8-attention off``: the GEMMs only);
  - `fp8-triton`, `fp8-cudnn`, `fp8-fa3`: dense attention by that fp8 kernel alone
    (``fp8_attention.DENSE_KERNELS`` set before the CLI starts; the CLI has no option for it).

  Timings, peak memory and the attention kernels used come from the sidecar.
  ``triton_cache_entries_added`` counts what the run added to Triton's on-disk cache: a run
  that compiles kernels pays in its first step; later runs on the machine read the cache.
  Each run saves its final latents; the others' relative distance from bf16's goes in the
  table (same seed, so the same noise). Saving them (~10 MB) falls in our runs' "write"
  stage, so in their totals: a small handicap.

The checkpoint is real-size synthetic, made on the GPU machine beforehand:
``longcat-tools synth --preset real --dtype bf16 CKPT`` (native layout, 38 GB). Run the
original first; its page-cache state is then the same for everyone. ``e2e_vs_original.json``
is rewritten after every run, so a call cut short keeps the runs it finished; a run past
``--timeout`` becomes an error row.

  PYTHONPATH=. python3 benchmarks/e2e_vs_original.py --ckpt CKPT --original /path/LongCat-Video
  PYTHONPATH=. python3 benchmarks/e2e_vs_original.py --ckpt TINY --original ... --small  # CPU
  PYTHONPATH=. python3 benchmarks/e2e_vs_original.py --ckpt CKPT --no-original --ours bf16,fp8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = ("In a realistic photography style, a white boy around seven or eight years old sits on "
          "a park bench with an ice cream cone beside a golden Labrador.")
OURS = {"bf16": [], "fp8": ["--precision", "fp8"],
        "fp8+te": ["--precision", "fp8", "--offload", "text-encoder"],
        "fp8-bf16attn": ["--precision", "fp8", "--fp8-attention", "off"],
        "fp8-triton": ["--precision", "fp8"], "fp8-cudnn": ["--precision", "fp8"],
        "fp8-fa3": ["--precision", "fp8"]}
# Python run before the CLI, per setting
PREAMBLE = {f"fp8-{kernel}": "from longcat_tools.kernels import fp8_attention as f; "
                             f"f.DENSE_KERNELS[:] = [{kernel!r}]"
            for kernel in ("triton", "cudnn", "fa3")}
# issue #21: total time as a fraction of the original's
TARGETS = {"bf16": 0.75, "fp8": 0.55}


def original_child(a: argparse.Namespace) -> None:
    """The original pipeline in this process; prints one JSON line."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from vs_original import flash_attn_standin

    sys.modules.setdefault("flash_attn", flash_attn_standin())
    sys.path.insert(0, str(a.original))
    from longcat_video.context_parallel.context_parallel_util import init_context_parallel
    from longcat_video.modules.autoencoder_kl_wan import AutoencoderKLWan
    from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel
    from longcat_video.modules.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )
    from longcat_video.pipeline_longcat_video import LongCatVideoPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    cuda = not a.small
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29513")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    init_context_parallel(context_parallel_size=1, global_rank=0, world_size=1)
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    ckpt = str(a.ckpt)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(ckpt, subfolder="tokenizer")
    te = UMT5EncoderModel.from_pretrained(ckpt, subfolder="text_encoder", torch_dtype=dtype)
    vae = AutoencoderKLWan.from_pretrained(ckpt, subfolder="vae", torch_dtype=dtype)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(ckpt, subfolder="scheduler")
    dit = LongCatVideoTransformer3DModel.from_pretrained(
        ckpt, subfolder="dit", cp_split_hw=[1, 1], torch_dtype=dtype, enable_flashattn2=True,
        enable_flashattn3=False, enable_xformers=False)
    pipe = LongCatVideoPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, dit=dit)
    pipe.to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t1 = time.perf_counter()
    pipe.dit.load_lora(os.path.join(ckpt, "lora/cfg_step_lora.safetensors"), "cfg_step_lora",
                       lora_network_dim=a.lora_rank)
    pipe.dit.enable_loras(["cfg_step_lora"])
    sync()
    t2 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(42)
    pipe.generate_t2v(prompt=PROMPT, height=a.height, width=a.width, num_frames=a.frames,
                      num_inference_steps=a.steps, use_distill=True, guidance_scale=1.0,
                      generator=gen)
    sync()
    t3 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    print(json.dumps({"run": "original", "load_s": round(t1 - t0, 2),
                      "lora_s": round(t2 - t1, 2), "generate_s": round(t3 - t2, 2),
                      "total_s": round(t3 - t0, 2),
                      "peak_alloc_gib": None if peak is None else round(peak, 2)}))


def ours(a: argparse.Namespace, name: str, out: Path) -> dict:
    video = out / f"ours_{name.replace('+', '_')}.mp4"
    latents = video.with_suffix(".latents.safetensors")
    cli = [sys.executable, "-m", "longcat_tools"]
    if name in PREAMBLE:
        cli = [sys.executable, "-c", f"{PREAMBLE[name]}; import sys; "
               "from longcat_tools.cli import main; sys.exit(main(sys.argv[1:]))"]
    cmd = [*cli, "run", "-m", str(a.ckpt), "--task", "t2v",
           "--distill", "-p", PROMPT, "--height", str(a.height), "--width", str(a.width),
           "--frames", str(a.frames), "--steps", str(a.steps), "--out", str(video), "-q",
           "--save-latents", str(latents), *OURS[name]]
    if a.small:
        cmd += ["--device", "cpu", "--dtype", "fp32"]
    cached = triton_cache_entries()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"run": f"ours {name}", "error": f"timed out after {a.timeout:g} s"}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"run": f"ours {name}", "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    added = triton_cache_entries() - cached
    doc = json.loads(Path(f"{video}.json").read_text())
    peak = doc["peak_memory"].get("gpu_max_allocated_bytes")
    return {"run": f"ours {name}", "process_s": round(wall, 2), "total_s": doc["total_s"],
            "startup_s": doc.get("process_age_at_start_s"), "triton_cache_entries_added": added,
            "fp8_attention": doc.get("fp8_attention"),
            "timings_s": doc["timings_s"], "precision": doc.get("precision"),
            "peak_alloc_gib": None if peak is None else round(peak / 2**30, 2),
            "latents": str(latents), "step_s": doc.get("step_s")}


def triton_cache_entries() -> int:
    """Entries in Triton's on-disk cache (``TRITON_CACHE_DIR``, else ``TRITON_HOME`` or the
    home folder's ``.triton/cache``): one per compiled kernel, plus autotuning records."""
    home = Path(os.environ.get("TRITON_HOME") or Path.home())
    root = Path(os.environ.get("TRITON_CACHE_DIR") or home / ".triton" / "cache")
    return sum(1 for _ in root.iterdir()) if root.is_dir() else 0


def latent_differences(rows: list[dict]) -> None:
    """Each of our runs' final latents against ours in bf16 (same seed, so the same noise):
    relative L2 distance, into the row."""
    from safetensors.torch import load_file

    base = next((r for r in rows if r["run"] == "ours bf16" and "latents" in r), None)
    if base is None:
        return
    ref = load_file(base["latents"])["latents"].double()
    for r in rows:
        if "latents" in r and r is not base:
            x = load_file(r["latents"])["latents"].double()
            r["final_latents_rel_diff_vs_bf16"] = round(((x - ref).norm() / ref.norm()).item(), 5)


def save(out: Path, info: dict, rows: list[dict]) -> None:
    """The rows so far, with their ratios to the original and latent differences, into
    ``e2e_vs_original.json``: rewritten after every run, so a call cut short keeps the runs
    it finished."""
    latent_differences(rows)
    base = rows[0].get("total_s")
    for r in rows[1:]:
        if base and "total_s" in r:
            r["ratio_to_original"] = round(r["total_s"] / base, 3)
            r["target"] = TARGETS.get(r["run"].split()[1])
    tmp = out / "e2e_vs_original.json.tmp"
    tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    tmp.replace(out / "e2e_vs_original.json")  # a kill mid-write leaves the last whole file


def gpu_name() -> str | None:
    """The GPU's name and driver, from nvidia-smi (this process leaves CUDA alone: a context
    here would hold memory through every run)."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None


def original(a: argparse.Namespace) -> dict:
    """The original's run, in a child process: its row."""
    cmd = [sys.executable, __file__, "--child", "--ckpt", str(a.ckpt), "--original",
           str(a.original)] + (["--small"] if a.small else [])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"run": "original", "error": f"timed out after {a.timeout:g} s"}
    if p.returncode != 0:
        return {"run": "original", "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return {**json.loads(p.stdout.strip().splitlines()[-1]),
            "process_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--original", type=Path, help="required unless --no-original")
    ap.add_argument("--no-original", action="store_true",
                    help="ours only (latent differences, no ratios)")
    ap.add_argument("--ours", default=",".join(OURS), help=f"comma list from {','.join(OURS)}")
    ap.add_argument("--small", action="store_true", help="CPU logic check (tiny checkpoint)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.height, a.width, a.frames, a.steps, a.lora_rank = (
        (32, 32, 9, 2, 4) if a.small else (480, 832, 93, 16, 128))
    if not a.no_original and a.original is None:
        ap.error("--original is required (or --no-original)")
    if a.child:
        original_child(a)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "ckpt": str(a.ckpt),
            "gpu_and_driver": gpu_name(),
            "task": f"t2v distill {a.width}x{a.height}, {a.frames} frames, {a.steps} steps"}
    rows = [original(a)] if not a.no_original else [{"run": "original", "error": "not run"}]
    print(json.dumps(rows[-1]), flush=True)
    save(out, info, rows)
    for name in a.ours.split(","):
        rows.append(ours(a, name, out))
        print(json.dumps(rows[-1]), flush=True)
        save(out, info, rows)
    print(f"\n{'run':<14} {'total s':>8} {'vs orig':>8} {'target':>7} {'peak GiB':>9} "
          f"{'latents vs bf16':>16}")
    for r in rows:
        print(f"{r['run']:<14} {r.get('total_s', float('nan')):>8} "
              f"{r.get('ratio_to_original', ''):>8} {r.get('target') or '':>7} "
              f"{r.get('peak_alloc_gib') or '':>9} "
              f"{r.get('final_latents_rel_diff_vs_bf16', ''):>16} {r.get('error', '')}")


if __name__ == "__main__":
    main()
