"""Many videos in one process: prompt lists × seeds × BSA settings, the weights loaded once.

A matrix is a list of ``Item`` (one video each: its ``RunSettings`` and where it came from),
planned and checked in full before anything loads. ``run_matrix`` loads the pipeline once and
runs the items in order, writing each as ``run`` writes one video (mp4 + sidecar) into the
output folder, and ``manifest.json`` after every item. An item whose mp4 and sidecar already
exist with the same settings is skipped, so an interrupted run resumes where it stopped.
Switching seed, prompt or BSA between items reloads nothing: BSA is a per-forward argument.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from longcat_tools.errors import EMPTY_PATH, LongcatError, UsageError, why_not_a_file
from longcat_tools.io import jsonio
from longcat_tools.model import bounds, chunks
from longcat_tools.runner.settings import (
    FLAGS,
    RunSettings,
    check_bsa,
    comparable_settings,
    input_stamps,
    run_precision,
    seed_matters,
    sidecar_settings,
    spelled,
    validate,
)

MANIFEST = "manifest.json"
JSONL_FIELDS = ("prompt", "negative_prompt", "image", "video", "seed", "out")
TEXT_FIELDS = tuple(f for f in JSONL_FIELDS if f != "seed")
PATH_FIELDS = ("image", "video", "out")  # file names: never empty, never with a NUL
PER_ITEM = (*JSONL_FIELDS, "bsa", "lora_scale")  # what differs between a matrix's videos
SLUG_WORDS, SLUG_CHARS = 6, 40


@dataclass(frozen=True)
class Item:
    """One video of a matrix: its index, settings and where it came from (for messages)."""

    index: int
    settings: RunSettings
    source: str  # "--prompts FILE line N" or "video NNN (its file name)"

    @property
    def name(self) -> str:
        return Path(self.settings.out).name


@dataclass(frozen=True)
class PromptLine:
    """One line of a ``--prompts`` file: the fields it sets, and its line number."""

    line: int
    fields: dict[str, Any]


def is_matrix(prompts: str | None, seeds: str | None, bsa: str,
              lora_scales: Sequence[float] = (1.0,)) -> bool:
    """Whether these ``run`` options ask for more than one video (or a prompt list)."""
    return prompts is not None or seeds is not None or "," in bsa or len(lora_scales) > 1


def read_prompts(path: str | Path) -> list[PromptLine]:
    """A ``--prompts`` file: one prompt a line, or JSONL (a line starting with ``{``) with the
    fields of ``JSONL_FIELDS``; blank lines and ``#`` comments are skipped. Image and video
    paths are relative to the file's folder."""
    path = Path(path)
    where = f"--prompts {path}"
    if not path.is_file():
        raise UsageError(f"{where}: {why_not_a_file(path, 'give the prompt file')}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first prompt
    except (OSError, UnicodeDecodeError) as e:
        raise LongcatError(f"{where}: cannot be read as UTF-8 text ({e})") from None
    if "\0" in text:  # UTF-16 (a Windows editor's "Unicode") decodes with a NUL a letter
        raise LongcatError(f"{where}: holds NUL characters (UTF-16, or not a text file); save "
                           "it as UTF-8 text")
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            out.append(PromptLine(n, {"prompt": line}))
            continue
        try:  # a repeated key is refused, not merged
            doc = jsonio.loads(line, f"{where} line {n}")
        except LongcatError as e:
            raise LongcatError(f"{e} (a line starting with '{{' is read as a JSON object; "
                               "start a plain prompt with another character)") from None
        if not isinstance(doc, dict):
            raise LongcatError(f"{where} line {n}: a JSON line must be an object")
        unknown = sorted(set(doc) - set(JSONL_FIELDS))
        if unknown:
            raise LongcatError(f"{where} line {n}: unknown field '{unknown[0]}' (fields: "
                               f"{', '.join(JSONL_FIELDS)})")
        for key in TEXT_FIELDS:
            if key in doc and not isinstance(doc[key], str):
                raise LongcatError(f"{where} line {n}: '{key}' must be a string")
        for key in PATH_FIELDS:
            if "\0" in doc.get(key, ""):
                raise LongcatError(f"{where} line {n}: '{key}' contains a NUL character")
            if doc.get(key) == "":  # '' meant the prompt file's folder
                raise LongcatError(f"{where} line {n}: '{key}': {EMPTY_PATH} (or leave the "
                                   "field out)")
        if "seed" in doc and (isinstance(doc["seed"], bool) or not isinstance(doc["seed"], int)):
            raise LongcatError(f"{where} line {n}: 'seed' must be an integer")
        if doc.get("seed", 0) not in bounds.SEEDS:
            raise LongcatError(f"{where} line {n}: 'seed' {doc['seed']} must fit in 64 bits")
        for key in ("image", "video"):
            if key in doc and not Path(doc[key]).is_absolute():
                doc[key] = str(path.parent / doc[key])
        out.append(PromptLine(n, doc))
    if not out:
        raise LongcatError(f"{where}: no prompts in the file (one prompt a line, or JSONL)")
    return out


def _numbers(text: str, option: str, kind: type, what: str, example: str) -> list:
    """A comma list of ``kind`` values, one line naming the first bad entry."""
    out = []
    for part in text.split(","):
        try:
            out.append(bounds.plain_number(part.strip(), kind))
        except ValueError:
            raise UsageError(f"{option} {text}: '{part.strip()}' is not {what} (a comma list "
                             f"such as {example})") from None
    return _distinct(out, option, text)


def _distinct(values: list, option: str, text: str) -> list:
    """A list's entries each once: a repeat would make the same video twice."""
    seen = set()
    for v in values:
        if v in seen:
            raise UsageError(f"{option} {text}: '{v}' is listed twice (the same video would be "
                             "made twice); list each value once")
        seen.add(v)
    return values


def parse_seeds(text: str) -> list[int]:
    """``--seeds 42,123,456``."""
    seeds = _numbers(text, "--seeds", int, "an integer", "42,123,456")
    states: dict[int, int] = {}
    for seed in seeds:
        bounds.check_seed(seed, "--seeds")
        first = states.setdefault(bounds.seed_state(seed), seed)
        if first != seed:
            raise UsageError(f"--seeds {text}: {first} and {seed} are one seed to torch (it "
                             "takes a negative seed modulo 2**64): the same video twice; list "
                             "one of them")
    return seeds


def parse_scales(text: str) -> list[float]:
    """``--lora-scale 0.5,1.0`` (one value: a single run's scale)."""
    return _numbers(text, "--lora-scale", float, "a number", "0.5,1.0")


def parse_bsa(text: str) -> list[str]:
    """``--bsa off,720p-balanced``: every entry a ``--bsa`` choice."""
    out = [p.strip() for p in text.split(",")]
    for choice in out:
        try:
            check_bsa(choice)
        except LongcatError as e:
            raise UsageError(f"--bsa list {text}: {e}") from None
    return _distinct(out, "--bsa", text)


def slug(text: str) -> str:
    """A few words of a prompt as a file-name part: lowercase letters, digits and dashes."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()[:SLUG_WORDS]
    return "-".join(words)[:SLUG_CHARS].strip("-") or "video"


def plan(base: RunSettings, out_dir: str | Path, prompts: str | Path | None = None,
         seeds: Sequence[int] | None = None, bsa: Sequence[str] | None = None,
         lora_scales: Sequence[float] | None = None) -> list[Item]:
    """The items of a matrix (prompts × seeds × BSA settings × LoRA scales, in that nesting;
    file names gain ``_lora{scale}`` when scales are given), every one
    checked as ``run`` checks a single video (inputs, sizes, the model's config), before anything
    loads. ``prompts``: a ``--prompts`` file, else ``base.prompt`` alone."""
    lines = read_prompts(prompts) if prompts is not None else [PromptLine(0, {})]
    if prompts is not None:  # options every line overrides would be dropped without a word
        if base.prompt and all("prompt" in pl.fields for pl in lines):
            raise UsageError(f"-p/--prompt: every line of --prompts {prompts} has its own prompt "
                             "(-p is for lines without one); drop -p")
        if seeds and all("seed" in pl.fields for pl in lines):
            raise UsageError(f"--seeds: every line of --prompts {prompts} sets its own 'seed'; "
                             "drop --seeds")
    seeds = list(seeds) if seeds else [base.seed]
    bsa = list(bsa) if bsa else [base.bsa]
    scales = list(lora_scales) if lora_scales else [None]
    out_dir = Path(out_dir)
    items: list[Item] = []
    for pl in lines:
        if pl.line and not str(pl.fields.get("prompt", base.prompt)).strip():
            raise LongcatError(f"--prompts {prompts} line {pl.line}: no prompt (give 'prompt' "
                               "on the line, or -p for the lines without one)")
        line_seeds = [pl.fields["seed"]] if "seed" in pl.fields else seeds
        videos = len(line_seeds) * len(bsa) * len(scales)
        if "out" in pl.fields and videos > 1:
            lists = [o for o, n in (("--seeds", len(line_seeds)), ("--bsa", len(bsa)),
                                    ("--lora-scale", len(scales))) if n > 1]
            raise UsageError(f"--prompts {prompts} line {pl.line}: 'out' names one video, but "
                             f"{' and '.join(lists)} make {videos} of this line (drop 'out', "
                             "or give the line its own 'seed' and one value for the others)")
        for seed in line_seeds:
            for b in bsa:
                for scale in scales:
                    i = len(items)
                    fields = {k: v for k, v in pl.fields.items() if k not in ("out", "seed")}
                    s = replace(base, **fields, seed=seed, bsa=b,
                                lora_scale=base.lora_scale if scale is None else scale)
                    tail = "" if scale is None else f"_lora{scale:g}"
                    name = pl.fields.get("out") or f"{i:03d}_{slug(s.prompt)}_{seed}_{b}{tail}.mp4"
                    source = (f"--prompts {prompts} line {pl.line}" if pl.line
                              else f"video {i:03d} ({name})")
                    items.append(Item(i, replace(s, out=str(_inside(out_dir, name, source))),
                                      source))
    owner: dict[str, Item] = {}
    same: dict[str, Item] = {}
    resolved = _bsa_resolver(base)
    for it in items:  # case-folded: one file on a case-insensitive file system
        first = owner.setdefault(it.name.casefold(), it)
        if first is not it:
            raise LongcatError(f"{it.source}: writes {it.name} as {first.source} does (give each "
                               "JSONL line its own 'out')")
        seeded = seed_matters(it.settings)
        key = replace(it.settings, out="", seed=bounds.seed_state(it.settings.seed) if seeded
                      else 0, bsa=resolved(it.settings))
        first = same.setdefault(repr(key), it)
        if first is not it and first.settings.seed != it.settings.seed and not seeded:
            raise UsageError(f"{it.source}: seed {it.settings.seed} makes the same video as "
                             f"seed {first.settings.seed} ({first.source}): t2v from --latents-in "
                             f"{it.settings.latents_in} draws no noise; give one seed")
        if first is not it and first.settings.bsa != it.settings.bsa:
            raise UsageError(f"--bsa: {first.settings.bsa} and {it.settings.bsa} run the same "
                             f"attention on this checkpoint at this size ({first.source} and "
                             f"{it.source} would be the same video); list one of them")
        if first is not it:  # as --seeds refuses a repeated seed
            raise UsageError(f"{it.source}: the same prompt, seed and settings as "
                             f"{first.source} (the same video would be made twice); give the "
                             "line another 'seed' or remove it")
    manifest = out_dir / MANIFEST
    if manifest.is_dir() and not manifest.is_symlink():  # found after the first video
        raise UsageError(f"--out-dir {out_dir}: {MANIFEST} there is a folder, where the run "
                         "writes its list of videos; move or remove it")
    if base.save_latents and len(items) > 1:  # each video would overwrite the one before
        raise UsageError(f"--save-latents {base.save_latents}: names one file, but this run makes "
                         f"{len(items)} videos; save the latents of one video in a run of its "
                         "own")
    for it in items:
        try:
            validate(it.settings)
        except LongcatError as e:  # keeps its exit code: an option's value or a file's
            raise type(e)(f"{it.source}: {e}") from None
    return items


def _bsa_resolver(base: RunSettings) -> Callable[[RunSettings], str]:
    """A video's ``--bsa`` as the attention it resolves to in each stage, so that ``config,off``
    on a checkpoint without BSA counts as one video listed twice (it was made twice); the value
    as given where the checkpoint cannot say (an avatar, a config the checks will refuse)."""
    from longcat_tools.checkpoint import layouts
    from longcat_tools.runner.attention import BSAParams, resolve_bsa

    try:
        cfg = layouts.detect(layouts.resolve_model(base.model)).config()
        params = cfg.get("bsa_params")
        default = BSAParams.from_config(params) if cfg.get("enable_bsa") is True else None
    except (LongcatError, KeyError, TypeError, ValueError):
        return lambda s: s.bsa

    def resolved(s: RunSettings) -> str:
        stages = [s.task == "refine"] + ([True] if s.refine and s.task != "refine" else [])
        one_frame = s.task != "refine" and chunks.latent_frames(s.frames)[1] <= 1
        try:  # a video of one latent frame attends densely whatever --bsa says
            return repr([None if one_frame and not refinement else
                         resolve_bsa(s.bsa, default, params, refinement)
                         for refinement in stages])
        except (LongcatError, KeyError, TypeError, ValueError):
            return s.bsa
    return resolved


def _inside(out_dir: Path, name: str, source: str) -> Path:
    """``out_dir/name``, refusing a name that could lead out of the folder the run owns: a
    plain file name only, so no path part (``..``, an absolute path, a symlinked subfolder)
    can point elsewhere."""
    if Path(name).name != name or name in (".", "..") or "\\" in name or not name.endswith(".mp4"):
        raise LongcatError(f"{source}: out '{name}' must be a .mp4 file name (no folders): "
                           f"every video goes into the output folder {out_dir}")
    return out_dir / name


def finished(item: Item, device: Any, stamp: str) -> bool:
    """Whether the item's mp4 and sidecar exist, the mp4 has the size the sidecar recorded
    (an emptied or cut file is made again), and the sidecar records the same settings,
    compared as the sidecar's JSON holds them, on the same kind of device (which GPU of a
    data-parallel run made it does not matter) and wherever the folder was named from (the
    sidecar sits next to its mp4), with ``--lora`` as the adapters and scales it resolves to,
    ``--precision`` as what the DiT computes in, from the checkpoint folder however its path
    is spelled, as it is now (``stamp``:
    ``layouts.content_stamp``; ``--bsa config`` reads its BSA from there) and from input files
    as they are now (``input_stamps``), with the latents file ``--save-latents`` asks for."""
    from longcat_tools.checkpoint import layouts
    from longcat_tools.runner.job import settings_record

    out = Path(item.settings.out)
    side = out.with_name(out.name + ".json")
    if not (out.is_file() and side.is_file()):
        return False
    if item.settings.save_latents and not Path(item.settings.save_latents).is_file():
        return False  # asked for on a resume: the video is made again to save them
    try:
        doc = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    want = json.loads(jsonio.dumps(jsonio.finite(settings_record(item.settings, device)),
                                   default=str))
    video = doc.get("video") if isinstance(doc, dict) else None
    size = out.stat().st_size
    if size == 0 or (isinstance(video, dict) and video.get("bytes", size) != size):
        return False
    made_from = doc.get("checkpoint") if isinstance(doc, dict) else None
    if not (isinstance(doc, dict) and isinstance(doc.get("settings"), dict)
            and isinstance(made_from, dict) and made_from.get("stamp") == stamp
            # a sidecar older than the stamps has none: right for a t2v, which reads no file
            and doc.get("inputs", {}) == input_stamps(item.settings)):
        return False
    s = item.settings
    root = layouts.resolve_model(s.model)
    try:
        adapters, stored_fp8 = _checkpoint_view(root, s.lora, stamp)
    except LongcatError:
        return False  # an adapter gone since: the run will say so
    precision = run_precision(s.precision, stored_fp8, want["dtype"])
    return sidecar_settings(doc) == comparable_settings(want, adapters, root, precision)


@functools.lru_cache(maxsize=8)
def _checkpoint_view(root: Path, lora: str | None, stamp: str
                     ) -> tuple[list[dict[str, Any]] | None, bool]:
    """What ``finished`` compares against, the same for every video of a matrix (the adapters
    ``--lora`` resolves to, whether the DiT is stored in fp8): read once, not once a video and
    twice on a resume. Keyed on the content stamp, so a changed checkpoint is read again."""
    from longcat_tools.checkpoint import layouts
    from longcat_tools.runner.lora import run_adapters

    adapters = None if lora is None else [{"name": a.name, "scale": a.scale}
                                          for a in run_adapters(root, lora)]
    return adapters, bool(getattr(layouts.detect_any(root), "is_fp8", False))


@spelled(FLAGS)
def run_matrix(items: Sequence[Item], reporter: Any, say: Callable[[str], None] = lambda _t: None,
               pipe: Any = None, share: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Any]]:
    """Run the items on one pipeline (loaded here once from the first item's settings, unless
    ``pipe`` is given); yields one record per item: its sidecar, or its manifest entry when its
    files were already there. ``say`` gets one line per video (the per-video stage lines would
    repeat for every one). ``manifest.json`` in the output folder is rewritten before every
    yield. ``share`` (rank, ranks): this process runs every ranks-th item from its rank on, and
    leaves the manifest to the launcher (``write_manifest``)."""
    import torch

    from longcat_tools.checkpoint import layouts
    from longcat_tools.runner import job as runjob
    from longcat_tools.runner.settings import resolve_device, run_dtype

    if not items:
        return
    rank, ranks = share
    mine = [it for it in items if it.index % ranks == rank]
    base = items[0].settings
    device = resolve_device(base.device) if pipe is None else pipe.device
    mode = own = None
    if pipe is not None:
        _check_pipe(pipe, base, device)
        # the caller's mode and adapters (a --lora item replaces them): given back at the end
        mode, own = pipe.transformer.lora_mode, list(pipe.transformer.active_loras)
    out_dir = Path(base.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = [_entry(it, "pending") for it in items]
    t0 = time.perf_counter()
    root = None
    stamp = layouts.content_stamp(pipe.root if pipe is not None and pipe.root else
                                  layouts.resolve_model(base.model))
    if pipe is None and not all(finished(it, device, stamp) for it in mine):
        root, pipe = runjob.load_pipeline(base, reporter, say, None, device,
                                          run_dtype(base.dtype, device))
    elif pipe is not None:
        root = pipe.root or layouts.resolve_model(base.model)
    load_s = round(time.perf_counter() - t0, 3)
    desc = "videos" if ranks == 1 else f"videos (process {rank + 1} of {ranks})"
    try:
        for it in reporter.steps(mine, len(mine), desc):
            if finished(it, device, stamp):
                records[it.index] = {**_entry(it, "skipped"), **_timing(it)}  # took then
                say(f"[{it.index + 1}/{len(items)}] {it.name}: done already, skipped")
                doc = records[it.index]
            else:
                say(f"[{it.index + 1}/{len(items)}] {it.name}")
                reporter.reset()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with runjob.output_lock(it.settings.out, pipe.is_main):
                    doc = runjob.run_video(it.settings, root, pipe, reporter, lambda _t: None,
                                           device, time.perf_counter())
                records[it.index] = {**_entry(it, "done"), "total_s": doc["total_s"],
                                     "peak_memory": doc["peak_memory"]}
            if ranks == 1:
                _write_manifest(out_dir, base, records, load_s)
            yield doc
    finally:
        if mode is not None:
            pipe.transformer.lora_mode = mode
            pipe.transformer.enable_loras(own, lazy=True)


def _check_pipe(pipe: Any, base: RunSettings, device: Any) -> None:
    """A pipeline handed in must be what the items' settings load: the sidecars record those
    (a bf16 pipe made videos recorded as fp32, which a later fp32 matrix skipped as done)."""
    from longcat_tools.runner.loading import parse_dtype
    from longcat_tools.runner.settings import PRECISIONS, run_dtype

    want = parse_dtype(run_dtype(base.dtype, device))
    if pipe.transformer.dtype != want:
        raise UsageError(f"pipe=: its DiT is in {pipe.transformer.dtype}, the items' settings "
                         f"ask for {want} (dtype={base.dtype!r}); load the pipeline so, or set "
                         "the items' dtype to the pipeline's")
    fp8 = PRECISIONS[base.precision]
    if fp8 is not None and fp8 != pipe.transformer.is_fp8:
        has = "fp8" if pipe.transformer.is_fp8 else "not fp8"
        raise UsageError(f"pipe=: its DiT's GEMMs are {has}, the items' settings ask for "
                         f"precision={base.precision!r}")


def write_manifest(items: Sequence[Item], device: Any) -> dict[str, Any]:
    """The manifest of a finished data-parallel run, from the files its processes wrote (each
    video's time and peak memory from its sidecar)."""
    from longcat_tools.checkpoint import layouts

    records = []
    stamp = layouts.content_stamp(layouts.resolve_model(items[0].settings.model))
    for it in items:
        entry = _entry(it, "done" if finished(it, device, stamp) else "missing")
        if entry["status"] == "done":
            entry.update(_timing(it))
        records.append(entry)
    out_dir = Path(items[0].settings.out).parent
    _write_manifest(out_dir, items[0].settings, records, None)
    return json.loads((out_dir / MANIFEST).read_text())


def _timing(it: Item) -> dict[str, Any]:
    """A finished video's time and peak memory, from its sidecar."""
    doc = json.loads(Path(it.settings.out + ".json").read_text())
    return {"total_s": doc.get("total_s"), "peak_memory": doc.get("peak_memory")}


def _entry(it: Item, status: str) -> dict[str, Any]:
    s = it.settings
    return {"index": it.index, "file": it.name, "sidecar": it.name + ".json", "status": status,
            "source": it.source, "prompt": s.prompt, "seed": s.seed, "bsa": s.bsa,
            "lora_scale": s.lora_scale}


def _write_manifest(out_dir: Path, base: RunSettings, records: list[dict[str, Any]],
                    load_s: float | None) -> None:
    from longcat_tools.io import jsonio
    from longcat_tools.io.atomic import atomic_write_text

    doc = {"items": records, "load_s": load_s,
           "settings": {k: v for k, v in asdict(base).items() if k not in PER_ITEM}}
    atomic_write_text(out_dir / MANIFEST, jsonio.dumps(doc))
