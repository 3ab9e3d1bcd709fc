"""``longcat-tools run``: every LongCat-Video task on any checkpoint layout, through our runner."""

from __future__ import annotations

from typing import Annotated

import typer

from longcat_tools.cli._common import JsonOpt, ModelOpt, Out, QuietOpt, VerboseOpt, human_bytes
from longcat_tools.errors import LongcatError
from longcat_tools.model.bsa_presets import PRESETS

TASK_HELP = ("t2v (text to video), i2v (image to video), vc (video continuation), long "
             "(chained continuations), refine (480p -> 720p with the refinement LoRA and BSA)")


def run_cmd(
    task: Annotated[str, typer.Option("--task", "-t", help=TASK_HELP)] = "t2v",
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What the video shows.")] = "",
    model: ModelOpt = None,
    image: Annotated[str | None, typer.Option(metavar="FILE", help="First frame (i2v; optional "
                                              "condition for refine).")] = None,
    video: Annotated[str | None, typer.Option(metavar="FILE", help="Video to continue (vc, long) "
                                              "or the stage-1 video (refine).")] = None,
    distill: Annotated[bool, typer.Option(help="Distilled sampling: cfg_step LoRA, 16 steps, "
                                          "guidance 1.")] = False,
    refine: Annotated[bool, typer.Option(help="Refine the result to 720p/30 fps afterwards "
                                         "(t2v, i2v, vc, long).")] = False,
    bsa: Annotated[str, typer.Option(help="Block sparse attention: config (what the transformer "
                                     "config says; always on for refinement), on, off, or a "
                                     f"preset ({', '.join(PRESETS)}).")] = "config",
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default 50; 16 with "
                                              "--distill).")] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG-Zero* guidance scale (default 4; 1 "
                                                   "with --distill; 1 disables CFG).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random draw.")] = 42,
    resolution: Annotated[str, typer.Option(help="Bucket for i2v/vc sizes: 480p or 720p.")] =
    "480p",
    height: Annotated[int | None, typer.Option(help="Output height in px (multiple of 16); t2v "
                                               "default 480, i2v/vc from the bucket, refine "
                                               "from the 720p bucket.")] = None,
    width: Annotated[int | None, typer.Option(help="Output width in px (multiple of 16); t2v "
                                              "default 832.")] = None,
    frames: Annotated[int, typer.Option(help="Frames to generate (4k+1).")] = 93,
    fps: Annotated[float | None, typer.Option(help="Frame rate of the mp4 (default 15; 30 after "
                                              "refinement).")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt under CFG "
                                                        "(default: the demos' Wan-style "
                                                        "prompt).")] = None,
    cond_frames: Annotated[int | None, typer.Option(help="Condition frames (vc/long: default "
                                                    "13; refine: from --image).")] = None,
    segments: Annotated[int, typer.Option(help="long: number of continuation segments.")] = 2,
    kv_cache: Annotated[bool, typer.Option(help="vc/long: cache the condition frames' K/V.")] =
    True,
    offload_kv_cache: Annotated[bool, typer.Option(help="Keep the KV cache in CPU memory.")] =
    False,
    offload: Annotated[str, typer.Option(help="GPU memory: none, text-encoder (UMT5 on the CPU "
                                         "between prompts), dit (stream DiT blocks from CPU "
                                         "memory; fits 24 GB, slower) or all.")] = "none",
    vae_tiling: Annotated[bool, typer.Option(help="Tiled VAE decode (less GPU memory).")] =
    False,
    enhance_hf: Annotated[bool | None, typer.Option(help="vc: keep t>500 then 10 uniform steps "
                                                    "(default on unless --distill).")] = None,
    t_thresh: Annotated[float, typer.Option(help="Refinement start noise level (0..1).")] = 0.5,
    spatial_refine_only: Annotated[bool, typer.Option(help="Refine resolution only, keep the "
                                                      "frame count.")] = False,
    refine_height: Annotated[int | None, typer.Option(help="Refinement height (default: the 720p "
                                                      "bucket).")] = None,
    refine_width: Annotated[int | None, typer.Option(help="Refinement width.")] = None,
    out_file: Annotated[str, typer.Option("--out", "-o", metavar="FILE.mp4",
                                          help="Output video; a FILE.mp4.json sidecar is written "
                                          "next to it.")] = "output.mp4",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default bf16 on GPU, "
                                              "fp32 on CPU).")] = None,
    save_latents: Annotated[str | None, typer.Option(metavar="FILE", help="Save the final "
                                                     "latents (safetensors).")] = None,
    latents_in: Annotated[str | None, typer.Option(metavar="FILE", help="Initial noise "
                                                   "(safetensors, tensor 'latents').")] = None,
    gpus: Annotated[int, typer.Option(help="Split the DiT over N GPUs of this machine (starts "
                                      "N processes, context parallel).")] = 1,
    cp: Annotated[int, typer.Option(help="This process is one of N context-parallel ranks "
                                    "(under torchrun --nproc-per-node N).")] = 1,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Run a LongCat-Video task and write an H.264 mp4 plus a JSON sidecar."""
    import os
    from dataclasses import replace

    from longcat_tools.runner.job import RunSettings, run_job, validate
    from longcat_tools.runner.pipeline import Reporter

    if os.environ.get("RANK", "0") != "0":  # rank 0 of a context-parallel job speaks for it
        json_out, quiet = False, True
    out = Out(json_out, quiet, verbose)
    settings = RunSettings(
        model=model, task=task, prompt=prompt, out=out_file, image=image, video=video,
        negative_prompt=negative_prompt, distill=distill, refine=refine, bsa=bsa, steps=steps,
        guidance=guidance, seed=seed, resolution=resolution, height=height, width=width,
        frames=frames, fps=fps, num_cond_frames=cond_frames, segments=segments,
        kv_cache=kv_cache, offload_kv_cache=offload_kv_cache, offload=offload,
        vae_tiling=vae_tiling, enhance_hf=enhance_hf,
        t_thresh=t_thresh, spatial_refine_only=spatial_refine_only,
        refine_height=refine_height, refine_width=refine_width, device=device, dtype=dtype,
        save_latents=save_latents, latents_in=latents_in, cp=cp)
    if gpus != 1:
        from longcat_tools.cli._common import ARGV
        from longcat_tools.runner.launch import launch, without_option

        if gpus < 2 or cp != 1:
            raise LongcatError(f"--gpus {gpus}: use 2 or more GPUs, without --cp (--cp is for "
                               "processes started by torchrun)")
        validate(replace(settings, cp=gpus))
        raise typer.Exit(launch(gpus, without_option(ARGV, "--gpus")))
    reporter = Reporter(show=not quiet, say=out.say)
    doc = run_job(settings, reporter, say=out.say)
    v = doc["video"]
    out.say(f"wrote {doc['output']}: {v['frames']} frames {v['width']}x{v['height']} at "
            f"{v['fps']:g} fps (sidecar {doc['output']}.json)")
    mem = doc["peak_memory"]
    peak = mem.get("gpu_max_allocated_bytes", mem["cpu_max_rss_bytes"])
    out.table([[k, f"{t:.2f} s"] for k, t in doc["timings_s"].items()]
              + [["total", f"{doc['total_s']:.2f} s"], ["peak memory", human_bytes(peak)]],
              ["stage", "time"])
    out.result(doc)
