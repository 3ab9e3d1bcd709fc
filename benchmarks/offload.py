"""Our block swap, run-time LoRA and loader vs diffusers' / PEFT's machinery, on one DiT step.

Which to keep: each part times one distill step at 480p/93 frames (one forward, guidance 1,
fused glue on CUDA, bf16, random weights) per variant and checks its output against the
reference, since a faster variant that computes something else is worthless.

- offload: all resident (reference) vs our ``enable_block_swap`` vs diffusers'
  ``enable_group_offload`` (block_level, one block per group; without streams, with streams, and
  with ``record_stream``): seconds per step, peak GPU memory, output difference.
- lora (all resident): a random rank-128 adapter on the hub distill LoRA's targets, applied by our
  ``load_lora``/``enable_loras`` at run time (``Linear.loras``), by PEFT (``add_adapter`` with
  the same adapter in PEFT's form: block-diagonal ``lora_B`` for fused qkv/kv), merged into the
  weights by hand, and by our merge mode (``lora_mode = "merge"``, with its merge and restore
  times).
- load: the DiT written as a native ``dit/`` folder, then loaded by our ``from_pretrained`` and by
  diffusers' generic ``ModelMixin`` loader, each in a fresh process (order A B A B): wall time,
  peak host RSS, peak GPU memory, and whether both give the written weights.

  PYTHONPATH=. python3 benchmarks/offload.py --preset real --device cuda --parts offload,lora
  PYTHONPATH=. python3 benchmarks/offload.py --preset real --device cuda --parts load
  PYTHONPATH=. python3 benchmarks/offload.py --preset tiny --device cpu --steps 2   # logic check

On CUDA the random weights are drawn on the GPU (seconds, where the CPU generator needs minutes
for 13.6B), and each variant moves them where it wants them. A variant that fails records its
error and the others still run; ``--deadline`` skips variants once that much time has passed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dit_forward import build, rel, sync, time_forward  # noqa: E402
from load_threads import evict  # noqa: E402

from longcat_tools import synth as S  # noqa: E402
from longcat_tools.io.safetensors import (  # noqa: E402
    TensorSpec,
    write_file,
    write_json,
    write_sharded,
)
from longcat_tools.lora import formats as lora_formats  # noqa: E402
from longcat_tools.runner import offload as off  # noqa: E402
from longcat_tools.runner.dit import LongCatTransformer3DModel  # noqa: E402

PARTS = ("offload", "lora", "load")
# preset: latent [C, T, H, W], text tokens, valid text tokens (real: one distill step at 480p,
# 93 frames; the others: small enough for a CPU logic check)
SHAPES = {"real": ((16, 24, 60, 104), 512, 40), "small": ((16, 4, 16, 16), 32, 8),
          "tiny": ((16, 2, 8, 8), 16, 5)}
DISTILL_T = 937.5  # a timestep of the distill schedule (0..1000 scale)
LORA_NAME = "distill"
GIB = 2**30


def forward_inputs(preset: str, caption_channels: int, device: str, seed: int = 1):
    latent, tokens, valid = SHAPES[preset]
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, *latent, generator=g, device=device)
    y = torch.randn(1, 1, tokens, caption_channels, generator=g, device=device)
    mask = torch.zeros(1, tokens, dtype=torch.long, device=device)
    mask[:, :valid] = 1
    return x, torch.tensor([DISTILL_T], device=device), y, mask


def time_steps(model, args, device: str, steps: int) -> tuple[dict, torch.Tensor]:
    """One untimed warm-up forward, then ``steps`` timed ones (``dit_forward.time_forward``);
    peaks cover the timed ones."""
    _, times, peak, reserved, out = time_forward(model, args, device, steps)
    row = {"mean_s": round(statistics.mean(times), 4), "min_s": round(min(times), 4),
           "times_s": [round(t, 4) for t in times]}
    if device == "cuda":
        row["peak_alloc_gib"], row["peak_reserved_gib"] = round(peak, 2), round(reserved, 2)
    return row, out.float().cpu()


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"max_abs_diff": float((out - ref).abs().max()), "rel_diff": rel(out, ref)}


def release() -> None:
    """Free what a finished variant held (diffusers' hook objects sit in reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- offload variants: (set up, undo) on a model resident on the device ----------------------
class EventBlockSwap(off.BlockSwap):
    """A candidate for ``runner.offload.BlockSwap``, measured here before it replaces it: no
    ``record_stream``. The copies are made in the side stream's memory pool, so dropping a
    block's copy frees that memory for the next copy at once; the side stream waits on a
    "compute done" event (recorded after each block) before it writes there. The aim: the
    reserved memory of diffusers' group offload at our speed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._done = None  # event: the compute stream is past the blocks dropped so far

    def _load(self, i: int) -> None:
        if self.stream is not None and self._done is not None and self._swapped(i) \
                and i not in self._ready:
            self.stream.wait_event(self._done)
        super()._load(i)

    def _pre(self, i: int):
        def hook(module, args) -> None:
            self._load(i)
            event = self._ready.get(i)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            self._load(i + 1)
        return hook

    def _post(self, i: int):
        drop = super()._post(i)

        def hook(module, args, output) -> None:
            if self.stream is not None and self._swapped(i):
                self._done = torch.cuda.Event()
                self._done.record(torch.cuda.current_stream(self.device))
            drop(module, args, output)
        return hook


def block_swap(model, device: str, cls: type = off.BlockSwap):
    model.block_swap = cls(model, device)

    def undo() -> None:
        model.block_swap.remove()  # puts the blocks back on the device
        del model.block_swap
    return undo


def group_offload(model, device: str, use_stream: bool, record_stream: bool = False):
    kw = {"record_stream": True} if record_stream else {}
    model.enable_group_offload(onload_device=torch.device(device),
                               offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=use_stream, **kw)

    def undo() -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks import group_offloading as go

        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in (go._GROUP_OFFLOADING, go._LAYER_EXECUTION_TRACKER,
                     go._LAZY_PREFETCH_GROUP_OFFLOADING):
            registry.remove_hook(name, recurse=True)
        model.to(device)
    return undo


def has_record_stream() -> bool:
    from diffusers.models.modeling_utils import ModelMixin

    return "record_stream" in inspect.signature(ModelMixin.enable_group_offload).parameters


def clean(model, device: str) -> str | None:
    """Why the model is not plain and resident on ``device`` after a variant (None: it is)."""
    dev = torch.device(device)
    stray = [n for n, p in model.named_parameters() if p.device.type != dev.type]
    if stray:
        return f"{len(stray)} tensors off {device} (e.g. {stray[0]})"
    hooked = [n for n, m in model.named_modules() if getattr(m, "_diffusers_hook", None)
              and m._diffusers_hook.hooks]
    if hooked or getattr(model, "block_swap", None) is not None:
        return f"hooks left ({hooked[:1] or 'block_swap'})"
    if any("lora_" in n for n, _ in model.named_modules()):
        return "PEFT layers left"
    return None


# ---- LoRA variants ---------------------------------------------------------------------------
def ours_lora(model, path: Path, device: str):
    model.lora_mode = "runtime"
    model.load_lora(str(path), LORA_NAME)
    model.enable_loras([LORA_NAME])

    def undo() -> None:
        model.disable_loras()
        model.lora_registry.pop(LORA_NAME, None)
        model.lora_mode = "merge"
    return undo


def ours_merged_lora(model, path: Path, device: str):
    """Our merge mode (``runner.lora_merge``): the set added into the weights once, restored
    bit for bit by ``disable_loras``; the merge and restore times go into the row's note (a
    model built in memory restores from pinned host copies; a loaded one re-reads its shards)."""
    model.lora_mode = "merge"
    model.load_lora(str(path), LORA_NAME)
    sync(device)
    t0 = time.perf_counter()
    model.enable_loras([LORA_NAME])
    sync(device)
    merge_s = time.perf_counter() - t0
    if model.merged_loras != [LORA_NAME]:
        raise RuntimeError("the adapter was not merged (it runs at run time here)")

    def undo() -> str:
        sync(device)
        t0 = time.perf_counter()
        model.disable_loras()
        sync(device)
        model.lora_registry.pop(LORA_NAME, None)
        return f"restore {time.perf_counter() - t0:.3f} s"
    return undo, f"merge {merge_s:.3f} s"


def peft_lora(model, lora: lora_formats.LoraFile, device: str):
    """The same adapter through PEFT: its config and A/B as our PEFT writer gives them."""
    from peft import LoraConfig

    cfg = lora_formats.peft_config(lora.modules.values())
    fields = set(inspect.signature(LoraConfig).parameters)
    model.add_adapter(LoraConfig(**{k: v for k, v in cfg.items() if k in fields
                                    and k not in ("task_type", "base_model_name_or_path")}),
                      adapter_name=LORA_NAME)
    modules = dict(model.named_modules())
    dtypes = set()
    with torch.no_grad():
        for entry in lora.modules.values():
            for key, t in lora_formats.output_tensors(entry.load(), "peft").items():
                target, role = key.removeprefix("transformer.").rsplit(".", 2)[:2]
                w = getattr(modules[target], role)[LORA_NAME].weight
                w.copy_(t.reshape(w.shape))
                dtypes.add(str(w.dtype))

    def undo() -> None:
        model.unload_lora()
    return undo, f"PEFT adapter weights {'/'.join(sorted(dtypes))}"


def merged_lora(model, lora: lora_formats.LoraFile, device: str):
    """W + delta in fp32, cast back (as ``lora fuse``); the original weights are kept to undo."""
    modules = dict(model.named_modules())
    kept = {}
    with torch.no_grad():
        for name, entry in lora.modules.items():
            m = entry.load()
            w = modules[name].weight
            kept[name] = w.detach().clone()
            m_dev = lora_formats.ModuleLora(m.module, m.down.to(device),
                                            [u.to(device) for u in m.ups], m.alpha_scale,
                                            m.kernel)
            w.copy_((w.float() + m_dev.delta(1.0, torch.float32).view(w.shape)).to(w.dtype))

    def undo() -> None:
        with torch.no_grad():
            for name, w in kept.items():
                modules[name].weight.copy_(w)
        kept.clear()
    return undo


# ---- loading ---------------------------------------------------------------------------------
def fingerprint(model) -> dict[str, list[float]]:
    """Per tensor: the sum and sum of squares in float64 (computed where the tensor is)."""
    out = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            d = t.double()
            out[name] = [d.sum().item(), d.square().sum().item()]
    return out


def same_weights(a: dict, b: dict) -> str | None:
    """None when two fingerprints agree (to reduction-order rounding), else the first mismatch."""
    if set(a) != set(b):
        return f"tensor names differ ({sorted(set(a) ^ set(b))[:2]})"
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            if abs(x - y) > 1e-9 * max(abs(x), abs(y), 1.0):
                return f"{k}: {x} vs {y}"
    return None


def write_dit(model, root: Path, preset: str, dtype: torch.dtype) -> dict:
    """``root/dit``: config.json and the native shards (as the hub's, same shard size), stored in
    ``dtype`` (the release is fp32: the loaders then cast on the way)."""
    (root / "dit").mkdir(parents=True, exist_ok=True)
    write_json(root / "dit" / "config.json", S.dit_config(preset, model.dims.depth))
    t0 = time.perf_counter()
    sd = model.state_dict()
    specs = [TensorSpec(n, dtype, tuple(t.shape), lambda t=t: t.detach().cpu().to(dtype))
             for n, t in sd.items()]
    files = write_sharded(root / "dit", "diffusion_pytorch_model", specs,
                          S.PRESETS[preset].dit_shard_bytes, S.ST_METADATA)
    write_s = time.perf_counter() - t0
    os.sync()
    return {"write_s": round(write_s, 1), "sync_s": round(time.perf_counter() - t0 - write_s, 1),
            "files": len(files), "gib": round(sum(s.nbytes for s in specs) / GIB, 2)}


def peak_rss_gib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    exec from the parent (the benchmark holding the model), VmHWM starts afresh."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_child(which: str, root: Path, device: str, out_json: Path) -> None:
    """One loader in this (fresh) process; what it measured goes to ``out_json``."""
    from diffusers.models.modeling_utils import ModelMixin

    rss_start = peak_rss_gib()
    if device == "cuda":
        torch.cuda.init()
    sync(device)
    t0 = time.perf_counter()
    if which == "ours":
        model = LongCatTransformer3DModel.from_pretrained(root, subfolder="dit",
                                                          torch_dtype=torch.bfloat16,
                                                          device=device)
    else:
        model = ModelMixin.from_pretrained.__func__(LongCatTransformer3DModel, root / "dit",
                                                    torch_dtype=torch.bfloat16,
                                                    device_map=device)
    sync(device)
    row = {"loader": which, "wall_s": round(time.perf_counter() - t0, 2),
           "peak_rss_gib": round(peak_rss_gib(), 2),
           "rss_before_load_gib": round(rss_start, 2),
           "devices": sorted({str(p.device) for p in model.parameters()}),
           "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    if device == "cuda":
        row["peak_gpu_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        row["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    row["fingerprint"] = fingerprint(model)
    out_json.write_text(json.dumps(row))


def run_loaders(root: Path, device: str, reference: dict, rounds: int, timeout: float,
                left: Callable[[], float], log: Callable[[dict], None],
                cold: bool = False) -> None:
    """Each loader in its own process, alternating; ``left()``: seconds before the deadline.
    ``cold``: every load also runs once after the checkpoint is evicted from the page cache.
    Rows carry GB/s: the checkpoint's bytes over the wall time of the load."""
    nbytes = sum(f.stat().st_size for f in (root / "dit").glob("*.safetensors"))
    runs = [(w, c) for w in ("ours", "diffusers") for c in ((False, True) if cold else (False,))]
    for i in range(rounds):
        for which, is_cold in runs:
            if is_cold:
                evict(root / "dit")
            if left() < 10:
                log({"part": "load", "variant": which, "round": i + 1,
                     "skipped": "past the deadline"})
                continue
            timeout = min(timeout, left())
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                res = Path(f.name)
            cmd = [sys.executable, __file__, "--load-child", which, "--root", str(root),
                   "--device", device, "--out-json", str(res)]
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                log({"part": "load", "variant": which, "round": i + 1,
                     "error": f"timed out after {timeout:.0f} s"})
                continue
            row = {"part": "load", "variant": which, "round": i + 1,
                   "cache": "cold" if is_cold else "warm",
                   "process_s": round(time.perf_counter() - t0, 1)}
            if p.returncode != 0 or not res.stat().st_size:
                row["error"] = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
            else:
                got = json.loads(res.read_text())
                mismatch = same_weights(got.pop("fingerprint"), reference)
                row.update(got, weights="equal to the written ones" if mismatch is None
                           else f"DIFFER: {mismatch}")
                row["gb_per_s"] = round(nbytes / 1e9 / got["wall_s"], 2)
            res.unlink(missing_ok=True)
            log(row)


# ---- the benchmark ---------------------------------------------------------------------------
class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.device, self.start = a, a.device, time.perf_counter()
        self.rows: list[dict] = []
        self.info: dict = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if a.device == "cuda" else
            (platform.processor() or platform.machine()),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(),  # the host, which the load part depends on
            "host_mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                  / 2**30, 1),
            "preset": a.preset, "steps": a.steps, "parts": a.parts, "notes": []}
        for mod in ("diffusers", "peft", "accelerate", "triton"):
            try:
                self.info[mod] = __import__(mod).__version__
            except ImportError:
                self.info[mod] = None
        self.model = None
        self.ref: torch.Tensor | None = None

    def save(self) -> None:
        self.info["wall_s"] = round(time.perf_counter() - self.start, 1)
        self.a.out_json.parent.mkdir(parents=True, exist_ok=True)
        self.a.out_json.write_text(json.dumps({"info": self.info, "rows": self.rows}, indent=1))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        self.save()
        print(json.dumps(row), flush=True)

    def note(self, text: str) -> None:
        self.info["notes"].append(text)
        print(f"note: {text}", flush=True)

    def build(self) -> None:
        t0 = time.perf_counter()
        self.model = build(self.a.preset, self.a.depth, self.device, torch.bfloat16, seed=0)
        self.model.enable_fast_ops(self.device == "cuda")
        sync(self.device)
        n = sum(p.numel() for p in self.model.parameters())
        self.info.update(params=n, build_s=round(time.perf_counter() - t0, 1))
        print(f"built {n / 1e9:.3f}B params on {self.device} in {self.info['build_s']} s",
              flush=True)
        self.args = forward_inputs(self.a.preset, self.model.dims.caption_channels, self.device)
        self.info["shapes"] = {"latents": list(self.args[0].shape),
                               "timestep": list(self.args[1].shape),
                               "text": list(self.args[2].shape),
                               "valid_text_tokens": int(self.args[3].sum())}

    def variant(self, part: str, name: str, setup: Callable[[], object],
                ref: torch.Tensor | None, extra_ref: dict[str, torch.Tensor] | None = None
                ) -> torch.Tensor | None:
        """Set up, time, compare with ``ref``, undo; any failure is recorded, not raised."""
        row: dict = {"part": part, "variant": name}
        if any(s and s in name for s in self.a.skip.split(",")):
            return None
        if time.perf_counter() - self.start > self.a.deadline:
            row["skipped"] = f"past the {self.a.deadline:.0f} s deadline"
            self.log(row)
            return None
        out = undo = None
        try:
            release()
            t0 = time.perf_counter()
            made = setup()
            undo, note = made if isinstance(made, tuple) else (made, None)
            sync(self.device)
            release()
            row["setup_s"] = round(time.perf_counter() - t0, 2)
            if note:
                row["note"] = note
            timing, out = time_steps(self.model, self.args, self.device, self.a.steps)
            row.update(timing)
            if not torch.isfinite(out).all():
                row["nonfinite"] = True
            if ref is not None:
                row.update(compare(out, ref))
            for label, r in (extra_ref or {}).items():
                row[f"rel_diff_vs_{label}"] = rel(out, r)
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not end the run
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            traceback.print_exc()
            out = None
        finally:
            t0 = time.perf_counter()
            try:
                said = undo() if undo is not None else None
                if isinstance(said, str):  # e.g. how long the undo itself took
                    row["note"] = "; ".join(filter(None, (row.get("note"), said)))
                problem = clean(self.model, self.device)
            except Exception as exc:  # noqa: BLE001
                problem = f"undo failed: {type(exc).__name__}: {exc}"[:300]
            if problem:  # start the next variant from a fresh model rather than a broken one
                self.note(f"after '{name}': {problem}; model rebuilt")
                self.model = made = undo = None
                release()
                self.build()
            row["teardown_s"] = round(time.perf_counter() - t0, 2)
        self.log(row)
        return out

    def reference(self) -> torch.Tensor | None:
        if self.ref is None:
            self.ref = self.variant("reference", "all resident", lambda: None, None)
        return self.ref

    def offload(self, folder: Path) -> None:
        dev = self.device
        ref = self.reference()
        self.variant("offload", "ours: block swap" + (" (prefetch stream)" if dev == "cuda"
                                                       else ""),
                     lambda: block_swap(self.model, dev), ref)
        if dev == "cuda":
            self.variant("offload", "candidate: block swap, compute-done event",
                         lambda: block_swap(self.model, dev, EventBlockSwap), ref)
            self.variant("offload", "diffusers group offload, use_stream",
                         lambda: group_offload(self.model, dev, True), ref)
            if has_record_stream():
                self.variant("offload", "diffusers group offload, use_stream + record_stream",
                             lambda: group_offload(self.model, dev, True, True), ref)
            else:
                self.note("this diffusers' enable_group_offload has no record_stream parameter")
        else:
            self.note("group offload with use_stream needs CUDA streams: stream variants "
                      "skipped on the CPU")
        self.variant("offload", "diffusers group offload, no stream",
                     lambda: group_offload(self.model, dev, False), ref)

    def lora(self, folder: Path) -> None:
        cfg = S.dit_config(self.a.preset, self.model.dims.depth)
        rank = S.PRESETS[self.a.preset].lora_rank
        path = folder / "cfg_step_lora.safetensors"
        t0 = time.perf_counter()
        write_file(path, S.lora_specs(cfg, "cfg_step", rank, 0, torch.bfloat16), S.ST_METADATA)
        lora = lora_formats.read_lora(path, lora_formats.linear_shapes(self.model.dims))
        self.info["lora"] = {"rank": rank, "targets": sorted(S.CFG_STEP_TARGETS),
                             "modules": len(lora.modules), "file_mib": round(
                                 path.stat().st_size / 2**20, 1),
                             "write_s": round(time.perf_counter() - t0, 1)}
        print(f"LoRA: {json.dumps(self.info['lora'])}", flush=True)
        base = self.reference()
        extra = {"no_lora": base} if base is not None else None
        dev = self.device
        ours = self.variant("lora", "ours: Linear.loras (run time)",
                            lambda: ours_lora(self.model, path, dev), None, extra)
        self.variant("lora", "PEFT add_adapter (run time)",
                     lambda: peft_lora(self.model, lora, dev), ours, extra)
        self.variant("lora", "merged into the weights", lambda: merged_lora(self.model, lora, dev),
                     ours, extra)
        self.variant("lora", "ours: lora_mode merge (merge + restore in note)",
                     lambda: ours_merged_lora(self.model, path, dev), ours, extra)

    def load(self, folder: Path) -> None:
        root = Path(self.a.ckpt_dir) if self.a.ckpt_dir else folder / "ckpt"
        t0 = time.perf_counter()
        reference = fingerprint(self.model)
        stored = {"fp32": torch.float32, "bf16": torch.bfloat16}[self.a.load_dtype]
        written = write_dit(self.model, root, self.a.preset, stored)
        written["stored_dtype"] = self.a.load_dtype
        written["fingerprint_s"] = round(time.perf_counter() - t0 - written["write_s"]
                                         - written["sync_s"], 1)
        self.info["load_checkpoint"] = {"path": str(root / "dit"), **written}
        print(f"wrote dit/: {json.dumps(written)}", flush=True)
        self.model = None  # the loaders get the whole GPU and host memory
        release()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # pinned host memory cached by the offload variants
        run_loaders(root, self.device, reference, self.a.load_rounds, self.a.load_timeout,
                    lambda: self.a.deadline - (time.perf_counter() - self.start), self.log,
                    cold=self.a.load_cold)

    def table(self) -> str:
        i = self.info
        lines = [f"# Offload / LoRA / loading, {i['device']}, torch {i['torch']}, diffusers "
                 f"{i['diffusers']}, peft {i['peft']}, {i['date']}", "",
                 f"{i.get('params', 0) / 1e9:.2f}B params, bf16 random weights, "
                 f"{i.get('shapes')}, {self.a.steps} timed steps after 1 warm-up. Diffs: "
                 "offload rows against all resident, LoRA rows against ours (run time); "
                 "rel = ||out - ref|| / ||ref||; 'vs no LoRA' is the adapter's own effect, "
                 "for scale.", "",
                 "| part | variant | mean s/step | min s/step | peak alloc GiB | "
                 "peak reserved GiB | max abs diff | rel diff | rel diff vs no LoRA | note |",
                 "|---|---|---|---|---|---|---|---|---|---|"]

        def f(v, fmt):
            return "" if v is None else format(v, fmt)

        steps = [r for r in self.rows if r["part"] != "load"]
        if not steps:
            del lines[-2:]
        for r in steps:
            note = r.get("error") or r.get("skipped") or r.get("note") or ""
            lines.append(
                f"| {r['part']} | {r['variant']} | {f(r.get('mean_s'), '.3f')} | "
                f"{f(r.get('min_s'), '.3f')} | {f(r.get('peak_alloc_gib'), '.2f')} | "
                f"{f(r.get('peak_reserved_gib'), '.2f')} | {f(r.get('max_abs_diff'), '.2e')} | "
                f"{f(r.get('rel_diff'), '.2e')} | {f(r.get('rel_diff_vs_no_lora'), '.2e')} | "
                f"{note} |")
        loads = [r for r in self.rows if r["part"] == "load"]
        if loads:
            lines += ["", "| loader | round | page cache | wall s | GB/s | process s | "
                      "peak RSS GiB | peak GPU alloc GiB | weights | note |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in loads:
                lines.append(f"| {r['variant']} | {r['round']} | {r.get('cache', 'warm')} | "
                             f"{f(r.get('wall_s'), '.2f')} | {f(r.get('gb_per_s'), '.2f')} | "
                             f"{f(r.get('process_s'), '.1f')} | "
                             f"{f(r.get('peak_rss_gib'), '.2f')} | "
                             f"{f(r.get('peak_gpu_alloc_gib'), '.2f')} | "
                             f"{r.get('weights', '')} | "
                             f"{r.get('error') or r.get('skipped') or ''} |")
        if i["notes"]:
            lines += [""] + [f"- {n}" for n in i["notes"]]
        return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="real", choices=tuple(SHAPES))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--depth", type=int, default=None, help="DiT blocks (default: the preset's)")
    ap.add_argument("--steps", type=int, default=3, help="timed forwards per variant")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {PARTS}")
    ap.add_argument("--out-json", type=Path, default=None,
                    help="default: $OUT/offload.json, else benchmarks/results/offload.json")
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="seconds: start no new variant after this much wall time")
    ap.add_argument("--ckpt-dir", default=None,
                    help="where the load part writes its checkpoint (default: a temp folder)")
    ap.add_argument("--skip", default="",
                    help="comma-separated: leave out variants whose name contains one of these")
    ap.add_argument("--load-dtype", default="bf16", choices=("bf16", "fp32"),
                    help="dtype of the load part's checkpoint on disk (loaded as bf16)")
    ap.add_argument("--load-rounds", type=int, default=2, help="A B rounds of the loaders")
    ap.add_argument("--load-cold", action="store_true",
                    help="also load after evicting the checkpoint from the page cache")
    ap.add_argument("--load-timeout", type=float, default=300, help="seconds per loader process")
    ap.add_argument("--load-child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.load_child:
        load_child(a.load_child, a.root, a.device, a.out_json)
        return
    parts = a.parts.split(",")
    if any(p not in PARTS for p in parts) or a.steps < 1:
        ap.error(f"--parts takes {', '.join(PARTS)}; --steps at least 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu)")
    if a.out_json is None:
        a.out_json = Path(os.environ.get("OUT", "benchmarks/results")) / "offload.json"

    b = Bench(a)
    b.build()
    b.save()
    with tempfile.TemporaryDirectory(prefix="longcat_offload_") as tmp:
        for part in PARTS:  # fixed order: the load part frees the model
            if part not in parts:
                continue
            t0 = time.perf_counter()
            try:
                getattr(b, part)(Path(tmp))
            except Exception as exc:  # noqa: BLE001 - keep what the other parts measured
                traceback.print_exc()
                b.log({"part": part, "variant": "(whole part)",
                       "error": f"{type(exc).__name__}: {exc}"[:400]})
            b.info[f"{part}_s"] = round(time.perf_counter() - t0, 1)
            print(f"part {part}: {b.info[f'{part}_s']} s", flush=True)
            b.save()
    md = b.table()
    a.out_json.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
