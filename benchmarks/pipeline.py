"""End-to-end pipeline time per stage: t2v 480p (50 steps, CFG), distill (16 steps), distill+refine.

Runs the ``runner`` pipeline on a checkpoint (any layout; for real-size random weights make one
with ``longcat-tools synth --preset real``) and reports, per scenario and memory option, the
seconds spent in each stage (text encoder, denoise, VAE, ...) and the peak GPU memory.

  PYTHONPATH=. python3 benchmarks/pipeline.py -m CKPT --device cuda --offload none,all
  PYTHONPATH=. python3 benchmarks/pipeline.py -m TINY --device cpu --small    # logic check

``--random real`` builds every component at the release's size with random weights in memory
instead (DiT 13.6B and UMT5-XXL encoder in bf16, Wan VAE; random rank-128 distill and
refinement LoRAs written to a temporary folder): no checkpoint, no download. Components are
built once on the CPU and placed for each ``--offload`` choice in turn. ``--steps N`` caps the
denoising steps (the per-step time is reported, so a full run's time follows from it).

  PYTHONPATH=. python3 benchmarks/pipeline.py --random real --device cuda \
      --offload none,text-encoder,dit,all --scenarios "t2v 480p distill 16 steps" --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_tools.runner import load_pipeline  # noqa: E402
from longcat_tools.runner.pipeline import LongCatVideoPipeline, Reporter  # noqa: E402

# name: (t2v kwargs, refine after it)
SCENARIOS = {
    "t2v 480p 50 steps CFG": (dict(steps=50, guidance=4.0, distill=False), False),
    "t2v 480p distill 16 steps": (dict(steps=16, guidance=1.0, distill=True), False),
    "t2v 480p distill + refine 720p": (dict(steps=16, guidance=1.0, distill=True), True),
}


def run_scenario(pipe, kw: dict, refine: bool, size: dict, refine_size: dict | None,
                 refine_steps: int) -> dict:
    pipe.reporter = Reporter()
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = pipe.t2v(prompt="a red panda eating bamboo in the snow", seed=0, **size, **kw)
    if refine:
        from PIL import Image

        stage1 = [Image.fromarray(f) for f in (r.frames * 255).astype("uint8")]
        pipe.refine(stage1, "a red panda eating bamboo in the snow", steps=refine_steps,
                    **(refine_size or {}))
    if cuda:
        torch.cuda.synchronize()
    stages = {k: round(v, 2) for k, v in pipe.reporter.timings.items()}
    return {"total_s": round(time.perf_counter() - t0, 2), "steps": kw["steps"],
            "stages_s": stages,
            "denoise_per_step_s": round(pipe.reporter.timings.get("denoise", 0.0) /
                                        (kw["steps"] + (refine_steps if refine else 0)), 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_reserved_gib": (round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda
                                  else None)}


class RandomComponents:
    """Every pipeline component with random weights at a synth preset's size, built once on
    the CPU (meta device, then filled: no fp32 copy of the 13.6B DiT) and placed per option."""

    def __init__(self, preset: str, dtype: torch.dtype, root: Path, seed: int = 0) -> None:
        import math

        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

        from longcat_tools import synth as S
        from longcat_tools import synth_components as SC
        from longcat_tools.io.safetensors import write_file
        from longcat_tools.runner.dit import LongCatTransformer3DModel

        p = S.PRESETS[preset]
        # random numbers drawn on the GPU when there is one (the CPU generator is serial: a
        # minute for the 19B parameters), then copied into the CPU tensors
        gen_dev = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator(device=gen_dev).manual_seed(seed)

        def fill(module: torch.nn.Module) -> torch.nn.Module:
            module = module.to(dtype).to_empty(device="cpu")
            with torch.no_grad():
                for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                    if not t.is_floating_point():
                        continue
                    r = torch.empty(t.shape, dtype=t.dtype, device=gen_dev)
                    if t.dim() >= 2:
                        r.normal_(0.0, 1.0 / math.sqrt(t[0].numel()), generator=g)
                    elif "norm" in name or "weight" in name:
                        r.normal_(1.0, 0.1, generator=g)
                    else:
                        r.normal_(0.0, 0.02, generator=g)
                    t.copy_(r)
            return module.eval().requires_grad_(False)

        cfg = S.dit_config(preset)
        with torch.device("meta"):
            dit = LongCatTransformer3DModel.from_config(cfg)
            te = UMT5EncoderModel(UMT5Config(**{k: v for k, v in SC.text_encoder_config(
                p, 384).items() if not k.startswith("_")}))
        self.dit, self.text_encoder = fill(dit), fill(te)
        vocab = SC.write_tokenizer(root / "tokenizer")
        if te.config.vocab_size < vocab:
            raise ValueError("tokenizer larger than the encoder's vocabulary")
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.vae = AutoencoderKLWan(**{k: v for k, v in SC.vae_config(p).items()
                                       if not k.startswith("_")}).to(dtype).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            **{k: v for k, v in S.SCHEDULER_CONFIG.items() if not k.startswith("_")})
        (root / "lora").mkdir(parents=True, exist_ok=True)
        for kind in ("cfg_step", "refinement"):
            write_file(root / "lora" / f"{kind}_lora.safetensors",
                       S.lora_specs(cfg, kind, p.lora_rank, seed, dtype), S.ST_METADATA)
        self.root = root

    def pipeline(self, device: torch.device, offload: str,
                 vae_tiling: bool) -> LongCatVideoPipeline:
        """The components placed for ``offload`` (runner.offload choices) on ``device``."""
        from longcat_tools.runner import offload as off

        self.release()
        if offload in ("dit", "all"):
            off.enable_block_swap(self.dit, device)
        else:
            self.dit.to(device)
        te_cpu = offload in ("text-encoder", "all")
        self.text_encoder.to("cpu" if te_cpu else device)
        self.vae.to(device)
        if vae_tiling:
            off.enable_vae_tiling(self.vae)
        elif hasattr(self.vae, "disable_tiling"):
            self.vae.disable_tiling()
        self.dit.enable_fast_ops(device.type == "cuda")
        pipe = LongCatVideoPipeline(self.tokenizer, self.text_encoder, self.vae, self.scheduler,
                                    self.dit)
        pipe.root, pipe.run_device = self.root, device
        pipe.layout = f"random weights ({offload})"
        pipe.offload_text_encoder = te_cpu
        return pipe

    def release(self) -> None:
        """Everything back on the CPU (block swap undone), GPU cache emptied."""
        swap = getattr(self.dit, "block_swap", None)
        if swap is not None:
            swap.remove()
            del self.dit.block_swap
        self.dit.disable_loras()
        for m in (self.dit, self.text_encoder, self.vae):
            m.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="checkpoint (or --random PRESET)")
    ap.add_argument("--random", default=None, choices=("tiny", "small", "real"),
                    help="random weights at a synth preset's size, built in memory")
    ap.add_argument("--steps", type=int, default=None, help="cap on denoising steps")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--offload", default="none",
                    help="comma-separated runner.offload choices; CHOICE+tiling: with VAE tiling")
    ap.add_argument("--vae-tiling", action="store_true")
    ap.add_argument("--scenarios", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes and 1-2 steps (logic check on a tiny checkpoint)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed 1-step run that compiles kernels first")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()

    if (a.model is None) == (a.random is None):
        ap.error("give one of -m CKPT and --random PRESET")
    dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    small = a.small or a.random in ("tiny", "small")
    size = dict(height=32, width=32, num_frames=5) if small else \
        dict(height=480, width=832, num_frames=93)
    refine_size = dict(height=48, width=48) if small else None
    scenarios = SCENARIOS
    if a.scenarios:
        scenarios = {k: v for k, v in SCENARIOS.items() if k in a.scenarios.split(",")}
    cap = a.steps if a.steps is not None else (2 if small else None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict]) -> dict:
        doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "model": str(a.model or f"random {a.random}"),
               "size": size, "steps_cap": cap, "small": small, "warmup": warm, "rows": rows}
        (out / "pipeline.json").write_text(json.dumps(doc, indent=1))
        return doc
    device = torch.device(a.device)
    rows: list[dict] = []
    warm: dict | None = None
    t0 = time.perf_counter()
    tmp = None
    if a.random:
        import tempfile

        from longcat_tools.runner.loading import parse_dtype

        tmp = tempfile.TemporaryDirectory(prefix="longcat_random_")
        comps = RandomComponents(a.random, parse_dtype(dtype), Path(tmp.name))
        print(f"built random {a.random} components in {time.perf_counter() - t0:.1f} s",
              flush=True)
    if not a.no_warmup:  # compile kernels and pin host memory outside the timed runs
        name, (kw, refine) = next(iter(scenarios.items()))
        first = a.offload.split(",")[0].partition("+")[0]
        pipe = comps.pipeline(device, first, False) if a.random else load_pipeline(
            a.model, device=a.device, dtype=dtype, offload=first)
        warm = {"offload": first, **run_scenario(pipe, dict(kw, steps=1), refine, size,
                                                   refine_size, 1)}
        print(f"warm-up: {json.dumps(warm)}", flush=True)
        del pipe
        if a.random:
            comps.release()
    for choice in a.offload.split(","):
        offload, _, extra = choice.partition("+")
        tiling = a.vae_tiling or extra == "tiling"
        t0 = time.perf_counter()
        if a.random:
            pipe = comps.pipeline(device, offload, tiling)
        else:
            pipe = load_pipeline(a.model, device=a.device, dtype=dtype, offload=offload,
                                 vae_tiling=tiling)
        load_s = round(time.perf_counter() - t0, 1)
        for name, (kw, refine) in scenarios.items():
            kw = dict(kw, steps=min(kw["steps"], cap)) if cap else kw
            refine_steps = min(50, cap) if cap else 50
            row = {"scenario": name, "offload": offload, "vae_tiling": tiling,
                   "load_s": load_s,
                   **run_scenario(pipe, kw, refine, size, refine_size, refine_steps)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(rows)  # kept if a later option runs out of time
        del pipe
        if a.random:
            comps.release()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    doc = save(rows)
    lines = [f"# Pipeline, {doc['device']}, torch {doc['torch']}, {doc['date']}", "",
             f"{doc['model']}, {size}, steps capped at {cap} (per-step time reported).", "",
             "| scenario | offload | VAE tiling | steps | total (s) | per step (s) | "
             "peak alloc (GiB) | peak reserved (GiB) | stages (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stages = ", ".join(f"{k} {v}" for k, v in r["stages_s"].items())
        lines.append(f"| {r['scenario']} | {r['offload']} | {r['vae_tiling']} | {r['steps']} | "
                     f"{r['total_s']} | {r['denoise_per_step_s']} | {r['peak_gib']} | "
                     f"{r['peak_reserved_gib']} | {stages} |")
    md = "\n".join(lines) + "\n"
    (out / "pipeline.md").write_text(md)
    print(md)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
