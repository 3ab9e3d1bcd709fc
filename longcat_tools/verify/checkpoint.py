"""``verify``: every check of a checkpoint, in one report (a CI gate).

Header level (default) reads only JSON files and safetensors headers: the real 13.6B checkpoint
is checked in a fraction of a second. ``deep`` then reads every byte once: NaN/Inf, all-zero
weights and sha256 against ``checksums.sha256``. Each check records its own pass/warn/fail; an
error in one never hides the others.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longcat_tools import schemas
from longcat_tools.checkpoint import comfy_single, layouts
from longcat_tools.checkpoint.hub import snapshot_roots
from longcat_tools.errors import LongcatError, UsageError, refuse_empty, why_not_a_file
from longcat_tools.io import jsonio
from longcat_tools.io.safetensors import Header
from longcat_tools.model import bounds, comfy_keys, keymap
from longcat_tools.verify import components as C
from longcat_tools.verify import deep as D
from longcat_tools.verify import lora as L
from longcat_tools.verify import quantized
from longcat_tools.verify.report import Recorder, Report, count, listing
from longcat_tools.verify.weights import WeightSet, dtypes, expect, read_weights

MAX_ENTRIES = 100_000  # files and folders in a checkpoint (the real one has a few dozen)
CKPT = "checkpoint"


@dataclass
class _State:
    """What earlier checks learned, for the checks that depend on it."""

    root: Path
    allowed: tuple[Path, ...] = ()
    layout: str | None = None
    tdir: Path | None = None
    dit_name: str = "transformer"
    files: list[Path] = field(default_factory=list)  # regular files inside the checkpoint
    model_index: dict[str, Any] | None = None
    dit_cfg: dict[str, Any] | None = None
    dims: keymap.DiTDims | None = None
    cfg_flavour: str | None = None
    flavour: str | None = None
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, WeightSet] = field(default_factory=dict)
    loras: dict[Path, L.LoraFile] = field(default_factory=dict)
    lora_headers: dict[Path, Header] = field(default_factory=dict)
    unlisted: str = ""  # a note on files the checksum list leaves out


def verify(path: str | Path, *, deep: bool = False, checksums: str | Path | None = None,
           strict: bool = False, against_hub: bool = False, manifest: str | Path | None = None,
           repo: str | None = None,
           progress: Callable[[int, int], None] | None = None) -> Report:
    """Check a checkpoint folder; never raises for a bad checkpoint (that is a failed check),
    only UsageError for arguments that name nothing.

    ``checksums`` names a sha256sum-format list (default: ``checksums.sha256`` in the folder)
    and implies ``deep``. ``against_hub`` compares every file with the hub's sizes and hashes
    (``hub_manifest``; ``manifest`` FILE or ``repo`` ``org/name[@rev]`` say which record and
    imply it). ``progress(done, total)`` sees the bytes read by the deep pass and the hub check.
    """
    t0 = time.perf_counter()
    refuse_empty(path, "verify")
    root = Path(path)
    if not root.exists():
        if not root.is_symlink():
            raise UsageError(f"{root}: no such file or folder (pass a checkpoint folder)")
        why = why_not_a_file(root)
        if why.startswith("a symlink loop"):  # resolve() would raise; a broken link is a check
            raise UsageError(f"{root}: {why} (pass a checkpoint folder)")
    sums = Path(checksums).absolute() if checksums is not None else None  # reported where it is
    for given, noun, option in ((sums, "checksum file", "--checksums"),
                                (manifest, "hub manifest", "--manifest")):
        if given is not None and not Path(given).is_file():  # bad input, before any check runs
            why = why_not_a_file(given, f"give the {noun} itself")
            why = f"no such {noun}" if why == "no such file" else why
            raise UsageError(f"{Path(given).absolute()}: {why} ({option})")
    if is_comfy(root) and (against_hub or manifest is not None or repo is not None):
        raise UsageError(f"{root}: a ComfyUI single-file DiT has no hub record to compare with "
                         "(--against-hub reads the release's own layout); drop the option")
    report = Report(str(root), deep=deep or sums is not None, strict=strict)
    rec = Recorder(root, report, snapshot_roots(root) if root.is_dir() else ())
    st = _State(root, rec.allowed)
    with rec.guard(CKPT, "verify", root):  # a fault outside any check still is one failed check
        _run(rec, st, report.deep, sums, progress)
        if against_hub or manifest is not None or repo is not None:
            _against_hub(rec, st, manifest, repo, progress)
    report.layout, report.flavour = st.layout, st.flavour
    report.stats |= {
        "files": len(st.files), "bytes": sum(_size(p) for p in st.files),
        "tensors": sum(len(w.tensors) for w in st.weights.values()),
        "parameters": sum(t.numel for t in st.weights[st.dit_name].tensors.values())
        if st.dit_name in st.weights else 0,
    }
    report.seconds = time.perf_counter() - t0
    return report


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _run(rec: Recorder, st: _State, deep: bool, sums: Path | None,
         progress: Callable[[int, int], None] | None) -> None:
    root = st.root
    if root.is_file() and root.name.endswith(".safetensors"):
        st.files = [root]
        _comfy(rec, st, root)
        _checksums_and_deep(rec, st, deep, sums, progress)
        return
    if not root.is_dir():
        rec.fail(CKPT, "layout", root, "not a folder (a checkpoint is a folder with dit/ or "
                 "transformer/) nor a ComfyUI single-file DiT (.safetensors)")
        return
    try:
        found = layouts.detect_any(root)
    except LongcatError:
        found = None  # judged by _layout, which names the problem
    if isinstance(found, layouts.AvatarCheckpoint):
        from longcat_tools.verify import avatar

        avatar.run(rec, st, found)
    elif found is None and (root / comfy_single.FILE_NAME).is_file():
        _walk(rec, st)
        _comfy(rec, st, root / comfy_single.FILE_NAME)
    else:
        _walk(rec, st)
        if not _layout(rec, st):
            return
        _model_index(rec, st)
        _dit(rec, st)
        for comp in C.COMPONENTS:
            _component(rec, st, comp)
        _consistency(rec, st)
        _loras(rec, st)
    _checksums_and_deep(rec, st, deep, sums, progress)


def is_comfy(root: Path) -> bool:
    """Whether ``root`` is a ComfyUI single-file DiT or the folder ``convert --to comfy`` writes
    (no DiT folder beside its file)."""
    if root.is_file():
        return root.name.endswith(".safetensors")
    return (root / comfy_single.FILE_NAME).is_file() and not layouts.looks_like_checkpoint(root)


def is_avatar(root: Path) -> bool:
    """Whether ``root`` is a LongCat-Video-Avatar folder, in either layout (a folder whose
    marks contradict each other is left to verify's checks)."""
    try:
        return bool(root.is_dir() and (layouts.avatar_version(root)
                                       or layouts.converted_avatar_version(root)))
    except LongcatError:
        return False


def _comfy(rec: Recorder, st: _State, path: Path) -> None:
    """A ComfyUI single-file DiT: what ``convert`` reads it with checks (names, shapes, dtypes,
    fp8 scales); the deep pass then scans its tensors."""
    st.layout, st.flavour = layouts.COMFY_SINGLE, comfy_keys.FLAVOUR
    with rec.guard("transformer", "layout", path):
        layouts.check_contained(path, rec.allowed or (path.parent.resolve(),))
        cf = comfy_single.read(path)
        header = cf.header
        st.weights["transformer"] = WeightSet("transformer", path.parent, [path], {path: header},
                                              dict(header.tensors),
                                              {n: path for n in header.tensors})
        scaled = (f"; fp8 scaled: {count(len(cf.scales), 'weight')} with scales"
                  if cf.scales else "")
        rec.ok("transformer", "layout", path, f"ComfyUI single-file DiT: depth "
               f"{cf.dims.depth}, hidden {cf.dims.hidden_size}, "
               f"{count(len(header.tensors), 'tensor')}{scaled}")


def _checksums_and_deep(rec: Recorder, st: _State, deep: bool, sums: Path | None,
                        progress: Callable[[int, int], None] | None) -> None:
    root = st.root
    sums_path = sums or (root / D.CHECKSUMS if (root / D.CHECKSUMS).exists() else None)
    rec.report.stats["checksums"] = rec.rel(sums_path) if sums_path else None
    listed = _checksum_list(rec, st, sums_path)
    if deep:
        _deep(rec, st, listed, progress)
    elif listed:
        rec.ok(CKPT, "checksums", sums_path, f"{count(len(listed), 'file')} listed; hashes "
               f"not compared (run with --deep){st.unlisted}")


# --- the folder itself ---------------------------------------------------------------------

def _walk(rec: Recorder, st: _State, pickles_ok: frozenset[Path] = frozenset()) -> None:
    """Every entry once, without following links: links must stay inside and lead to
    something, files must be regular, no pickle anywhere (but the ``pickles_ok`` files, which a
    later row checks without loading them)."""
    root, allowed = st.root, rec.allowed
    escapes, odd, pickles = [], [], []
    entries = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False,
                                                onerror=lambda e: odd.append(
                                                    (Path(e.filename or root),
                                                     f"cannot list ({e.strerror})"))):
        for name in sorted(dirnames) + sorted(filenames):
            entries += 1
            if entries > MAX_ENTRIES:
                rec.fail(CKPT, "paths", root, f"more than {MAX_ENTRIES:,} files and folders: not "
                         "a checkpoint (or the wrong folder)")
                return
            p = Path(dirpath) / name
            if name.endswith(layouts.PICKLE_SUFFIXES) and p not in pickles_ok:
                pickles.append(p)
            try:
                mode = p.lstat().st_mode
            except OSError as e:
                odd.append((p, f"cannot stat ({e.strerror})"))
                continue
            if stat.S_ISLNK(mode):
                try:
                    layouts.check_contained(p, allowed)
                except LongcatError as e:
                    escapes.append((p, str(e)))
                    continue
                if p.is_file():
                    st.files.append(p)
                elif not p.exists():
                    odd.append((p, "a link to nothing (its target is missing): restore the "
                                   "target, or remove the link"))
            elif stat.S_ISREG(mode):
                st.files.append(p)
            elif not stat.S_ISDIR(mode):
                odd.append((p, "not a regular file or folder (a FIFO, socket or device would "
                               "block or mislead loaders)"))
    for p, msg in escapes[:8]:
        rec.fail(CKPT, "paths", p, msg)
    for p, msg in odd[:8]:
        rec.fail(CKPT, "paths", p, msg)
    for p in pickles[:8]:
        rec.fail(CKPT, "paths", p, "pickle file: never loaded, and unsafe to load (convert it to "
                 "safetensors or remove it)")
    if not (escapes or odd or pickles):
        exempt = [rec.rel(p) for p in sorted(pickles_ok) if p.exists()]
        rec.ok(CKPT, "paths", root, f"{count(len(st.files), 'file')}; no link leaves the folder, "
               + (f"no pickle but {listing(exempt)} (see its row)" if exempt else "no pickle")
               + ", no special file")


def _inside(allowed: tuple[Path, ...], path: Path) -> bool:
    """False for a path that leads out of the checkpoint (the walk has reported its link):
    nothing behind it is read."""
    try:
        layouts.check_contained(path, allowed)
    except LongcatError:
        return False
    return True


def _layout(rec: Recorder, st: _State) -> bool:
    root = st.root
    try:
        ck = layouts.detect(root)
        st.layout, st.tdir, st.cfg_flavour = ck.layout, ck.transformer_dir, None
    except LongcatError as e:
        t = root / "transformer"
        if not t.is_dir():
            rec.fail(CKPT, "layout", root, str(e))
            return False
        # detect() could not read transformer/config.json: judge the layout by its files
        single = (t / layouts.FASTVIDEO_SINGLE).exists() and not (t / layouts.INDEX_NAME).exists()
        st.layout, st.tdir = ("fastvideo-single" if single else "converted"), t
    st.dit_name = st.tdir.name
    rec.ok(CKPT, "layout", root, {"native": "native (hub release: dit/)",
                                  "converted": "converted (model_index.json + sharded "
                                               "transformer/)",
                                  "fastvideo-single": "FastVideo single file "
                                                      "(transformer/model.safetensors)"}[st.layout])
    return True


def _model_index(rec: Recorder, st: _State) -> None:
    path = st.root / "model_index.json"
    name = C.model_index_schema(st.layout)
    if not (path.exists() or path.is_symlink()):
        if st.layout == "native":
            rec.warn(CKPT, "model_index", path, "missing (the hub release has a stub "
                     "{\"model_name\": \"LongCat-Video\"}; native loaders do not need it)")
        else:
            rec.fail(CKPT, "model_index", path, "missing: a model_index.json layout needs it "
                     "(pipelines pick their classes from it)")
        return
    with rec.guard(CKPT, "model_index", path):
        doc = jsonio.read(path, what="pipeline index")
        schemas.validate(doc, name, str(path))
        st.model_index = doc
        if st.layout == "native":
            rec.ok(CKPT, "model_index", path, f"hub stub ({doc['model_name']})")
            return
        missing = [c for c in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")
                   if not (st.root / c).is_dir()]
        if missing:
            rec.fail(CKPT, "model_index", path, f"names components with no folder: "
                     f"{listing(missing)}")
        else:
            rec.ok(CKPT, "model_index", path, f"{doc['_class_name']}, "
                   f"transformer {doc['transformer'][1]}")


# --- the transformer -----------------------------------------------------------------------

def _dit(rec: Recorder, st: _State) -> None:
    comp, tdir = st.dit_name, st.tdir
    assert tdir is not None
    if not _inside(st.allowed, tdir):
        rec.fail(comp, "files", tdir, "leads out of the checkpoint: not read")
        return
    cfg_path = tdir / "config.json"
    with rec.guard(comp, "config", cfg_path):
        cfg = jsonio.read(cfg_path, what="transformer config")
        C.check_transformer_config(cfg, str(cfg_path))
        st.dit_cfg = cfg
        st.dims = keymap.dit_dims(cfg, str(cfg_path))  # within model.bounds
        st.cfg_flavour = keymap.config_flavour(cfg)
        want = {"native": keymap.NATIVE_CLASS, "fastvideo-single": keymap.FASTVIDEO_CLASS}
        if st.layout in want and cfg["_class_name"] != want[st.layout]:
            raise LongcatError(f"{cfg_path}: _class_name {cfg['_class_name']} does not belong in "
                               f"the {st.layout} layout (expected {want[st.layout]})")
        d = st.dims
        bsa = cfg.get("bsa_params")
        bsa_s = ("on" if cfg.get("enable_bsa") else "off") + (
            f" (sparsity {bsa.get('sparsity')}"
            + (f", cdf {bsa['cdf_threshold']}" if bsa.get("cdf_threshold") is not None else "")
            + f", chunks q {bsa['chunk_3d_shape_q']} k {bsa['chunk_3d_shape_k']})" if bsa else "")
        rec.ok(comp, "config", cfg_path, f"{cfg['_class_name']}: depth {d.depth}, hidden "
               f"{d.hidden_size}, {d.num_heads} heads, BSA {bsa_s}")
    index, singles = C.DIT_WEIGHTS[st.layout]
    ws = read_weights(rec, comp, tdir, index, singles)
    st.weights[comp] = ws
    key_flavour = keymap.detect_flavour(set(ws.tensors)) if ws.tensors else None
    st.flavour = key_flavour or st.cfg_flavour
    if key_flavour and st.cfg_flavour and key_flavour != st.cfg_flavour:
        rec.fail(comp, "flavour", ws.label, f"tensors use {key_flavour} key names but "
                 f"config.json says {st.dit_cfg['_class_name']} ({st.cfg_flavour} keys)")
    elif ws.tensors and not key_flavour:
        rec.fail(comp, "flavour", ws.label, "tensor names are neither LongCat's native nor "
                 f"FastVideo's (first: {listing(list(ws.tensors)[:3])})")
    is_fp8 = quantized.declared(rec, comp, tdir)
    if st.dims is not None and st.flavour is not None and (ws.complete or bool(ws.tensors)):
        expect(rec, ws, dict(keymap.tensor_specs(st.dims, st.flavour, is_fp8)),
               f"config.json ({st.flavour} keys{', fp8' if is_fp8 else ''})")
    if not is_fp8:
        dtypes(rec, ws)
    if st.flavour is not None:
        quantized.check(rec, ws, st.flavour, is_fp8)


# --- tokenizer, text encoder, VAE, scheduler -----------------------------------------------

def _component(rec: Recorder, st: _State, comp: C.Component,
               folder: Path | None = None) -> None:
    """One component folder (default: in the checkpoint; an avatar's are in its base folder)."""
    folder = folder or st.root / comp.name
    if not _inside(rec.allowed, folder):
        rec.fail(comp.name, "files", folder, "leads out of the checkpoint: not read")
        return
    if not folder.is_dir():
        rec.fail(comp.name, "files", folder, "missing folder" if not folder.exists()
                 else "not a folder")
        return
    missing = [" or ".join(alts) for alts in comp.required
               if not any((folder / a).exists() or (folder / a).is_symlink() for a in alts)]
    if missing:
        rec.fail(comp.name, "files", folder, f"missing {listing(missing)}")
    cfg: dict[str, Any] | None = None
    if comp.config:
        fname, schema = comp.config
        p = folder / fname
        if p.exists() or p.is_symlink():
            with rec.guard(comp.name, "config", p):
                doc = jsonio.read(p, what=f"{comp.name} config")
                schemas.validate(doc, schema, str(p))
                if "num_layers" in doc:  # layers are enumerated: bounded like the DiT's
                    bounds.check_int(doc["num_layers"], "num_layers", str(p))
                cfg = st.configs[comp.name] = doc
                rec.ok(comp.name, "config", p, _config_summary(comp.name, doc))
    for name in C.TOKENIZER_JSON if comp.name == "tokenizer" else ():
        p = folder / name
        with rec.guard(comp.name, "config", p):
            if p.exists():
                C.check_tokenizer_file(p)
                rec.ok(comp.name, "config", p, "a JSON object")
    if comp.weights is None:
        if not missing and comp.name == "tokenizer":
            rec.ok(comp.name, "files", folder, "tokenizer files present")
        return
    index, singles = comp.weights
    ws = read_weights(rec, comp.name, folder, index, singles)
    st.weights[comp.name] = ws
    if cfg is not None and (ws.tensors or ws.complete):
        if comp.name == "text_encoder":
            expect(rec, ws, C.expected_tensors(comp.name, cfg, ws.tensors), "config.json",
                   unexpected="warn")
        elif comp.name == "vae":
            expect(rec, ws, C.expected_tensors(comp.name, cfg, ws.tensors),
                   "config.json (key layers)", unexpected=None)
    dtypes(rec, ws)


def _config_summary(name: str, cfg: dict[str, Any]) -> str:
    if name == "text_encoder":
        return f"UMT5: d_model {cfg['d_model']}, {cfg['num_layers']} layers, vocab " \
               f"{cfg['vocab_size']}"
    if name == "vae":
        return f"AutoencoderKLWan: z_dim {cfg['z_dim']}, base_dim {cfg['base_dim']}"
    if name == "scheduler":
        return f"FlowMatchEulerDiscreteScheduler: shift {cfg['shift']}"
    return "valid"


def _consistency(rec: Recorder, st: _State, base: Path | None = None) -> None:
    """Facts that two components must agree on (``base``: where the text encoder and VAE are,
    when not in the checkpoint)."""
    cfg, te, vae = st.dit_cfg, st.configs.get("text_encoder"), st.configs.get("vae")
    where = base or st.root
    problems: list[tuple[Path, str]] = []
    if cfg and te and te["d_model"] != cfg["caption_channels"]:
        problems.append((where / "text_encoder/config.json",
                         f"d_model {te['d_model']} but the transformer's caption_channels is "
                         f"{cfg['caption_channels']}"))
    if vae:
        for key in ("latents_mean", "latents_std"):
            if len(vae[key]) != vae["z_dim"]:
                problems.append((where / "vae/config.json", f"{key} has {len(vae[key])} "
                                 f"entries for z_dim {vae['z_dim']}"))
        if cfg:
            for key in ("in_channels", "out_channels"):
                if cfg[key] != vae["z_dim"]:
                    problems.append((where / "vae/config.json", f"z_dim {vae['z_dim']} but "
                                     f"the transformer's {key} is {cfg[key]}"))
    mi = st.model_index
    if cfg and mi and st.layout != "native" and mi["transformer"][1] != cfg["_class_name"]:
        problems.append((st.root / "model_index.json", f"transformer class "
                         f"{mi['transformer'][1]} but transformer/config.json says "
                         f"{cfg['_class_name']}"))
    for file, msg in problems:
        rec.fail(CKPT, "consistency", file, msg)
    if not problems and cfg and te and vae:
        rec.ok(CKPT, "consistency", st.root, "text encoder width, VAE latent channels and "
               "class names agree across components")


# --- LoRA adapters ------------------------------------------------------------------------

def _loras(rec: Recorder, st: _State) -> None:
    if not _inside(st.allowed, st.root / "lora"):
        rec.fail("lora", "files", st.root / "lora", "leads out of the checkpoint: not read")
        return
    files = L.lora_files(st.root)
    if st.layout == "native":
        for fname, adapter in layouts.NATIVE_LORAS.items():
            task = C.TASK_OF_ADAPTER[adapter]
            fused = layouts.fused_scale(st.dit_cfg or {}, "name", adapter) is not None
            if not fused and not (st.root / "lora" / fname).exists():
                rec.warn("lora", "files", st.root / "lora" / fname, f"missing: {task} will not "
                         "be available")
    shapes = L.dit_shapes(st.dims) if st.dims is not None else None
    flavour = st.flavour
    allowed = st.allowed
    for p in files:
        try:
            layouts.check_contained(p, allowed)
        except LongcatError:
            continue  # already a failed "paths" check
        lf = L.check_file(rec, p, flavour, shapes, st.layout or "")
        if lf is not None:
            st.loras[p] = lf
            if lf.header is not None:
                st.lora_headers[p] = lf.header
    L.check_manifest(rec, st.root, st.loras)


# --- the hub's record ------------------------------------------------------------------------

def _against_hub(rec: Recorder, st: _State, manifest: str | Path | None, repo: str | None,
                 progress: Callable[[int, int], None] | None) -> None:
    """Every file against the hub's size and hash (``hub_manifest``), one row per fault."""
    if not st.root.is_dir():
        return
    from longcat_tools.checkpoint import hub
    from longcat_tools.checkpoint import hub_manifest as hm

    ref = hub.repo_ref(repo) if repo else None
    try:
        m = hm.expected_files(st.root, ref.repo_id if ref else None,
                              ref.revision if ref else None, manifest)
    except UsageError:
        raise
    except LongcatError as e:
        rec.fail("hub", "hub", st.root, str(e))
        return
    total, done = hm.bytes_to_hash(st.root, m), 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    checks = hm.compare_with_manifest(st.root, m, hashes=True, progress=tick)
    bad = [c for c in checks if c.status in hm.FAIL]
    for c in bad[:8]:
        rec.fail("hub", c.status, st.root / c.file, c.message)
    if len(bad) > 8:
        rec.fail("hub", bad[8].status, st.root, f"and {len(bad) - 8} more files differ")
    if not bad:
        n_ok = sum(c.status == "ok" for c in checks)
        extra = [c.file for c in checks if c.status == "extra"]
        rev = f"@{m.commit[:12]}" if m.commit else ""
        rec.ok("hub", "hub", st.root, f"{count(n_ok, 'file')} match {m.repo_id}{rev} "
               f"(record: {m.source})" + (f"; not on the hub: {listing(extra, 2)}"
                                          if extra else ""))


# --- checksums and the deep pass --------------------------------------------------------------

def _checksum_list(rec: Recorder, st: _State, path: Path | None) -> dict[Path, str]:
    """The list's entries that exist; bad lines, escaping paths and missing files fail. Files it
    leaves out are only noted: ``convert`` lists what it wrote, not what it hard-linked."""
    if path is None:
        return {}
    listed, problems = D.parse_checksums(path, st.root if st.root.is_dir() else st.root.parent)
    for msg in problems[:8]:
        rec.fail(CKPT, "checksums", path, msg)
    if not listed and not problems:
        rec.fail(CKPT, "checksums", path, "lists no file: nothing to compare (sha256sum "
                 "format: '<hex>  <path>' a line)")
    missing = [p for p in listed if not p.is_file()]
    if missing:
        rec.fail(CKPT, "checksums", path, f"lists missing files ({len(missing)}): "
                 f"{listing([rec.rel(p) for p in missing])}")
    covered = set(listed) | {path}
    unlisted = [p for p in st.files if p not in covered and p.suffix in (".safetensors", ".json")]
    if unlisted:
        st.unlisted = (f"; not listed, so not hashed: {count(len(unlisted), 'weight/config file')}"
                       f" ({listing([rec.rel(p) for p in unlisted], 2)})")
    return {p: h for p, h in listed.items() if p.is_file()}


def _deep(rec: Recorder, st: _State, listed: dict[Path, str],
          progress: Callable[[int, int], None] | None) -> None:
    headers: dict[Path, tuple[str, Header]] = {}
    for comp, ws in st.weights.items():
        for p, h in ws.headers.items():
            headers[p] = (comp, h)
    for p, h in st.lora_headers.items():
        headers[p] = ("lora", h)
    todo = sorted(set(headers) | set(listed))
    total = sum(_size(p) for p in todo)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    bad_sums: list[tuple[Path, str]] = []
    clean: dict[str, list[int]] = {}
    for p in todo:
        comp, header = headers.get(p, ("checkpoint", None))
        res = D.scan_file(p, header, p in listed, tick)
        if res.error:
            rec.fail(comp, "deep", p, res.error)
            continue
        if p in listed and res.sha256 != listed[p]:
            bad_sums.append((p, f"sha256 {res.sha256} does not match the listed {listed[p]}"))
        if header is None:
            continue
        nonfinite = [f"{n} ({s.nan} NaN, {s.inf} Inf)" for n, s in res.tensors.items()
                     if s.nan or s.inf]
        zero = [n for n, s in res.tensors.items() if not s.nonzero
                and len(header.tensors[n].shape) >= 2 and header.tensors[n].numel > 0]
        if nonfinite:
            rec.fail(comp, "deep", p, f"NaN/Inf in {count(len(nonfinite), 'tensor')}: "
                     f"{listing(nonfinite, 3)}")
        if zero:
            (rec.warn if comp == "lora" else rec.fail)(
                comp, "deep", p,
                f"all-zero weights in {count(len(zero), 'tensor')}: {listing(zero)}"
                + (" (the adapter changes nothing there)" if comp == "lora" else ""))
        if not nonfinite and not zero:
            c = clean.setdefault(comp, [0, 0])
            c[0] += 1
            c[1] += len(res.tensors)
    for comp, (nfiles, ntensors) in clean.items():
        folder = st.weights[comp].folder if comp in st.weights else st.root / comp
        rec.ok(comp, "deep", folder if comp != "checkpoint" else st.root,
               f"{count(ntensors, 'floating tensor')} in {count(nfiles, 'file')}: no NaN/Inf, "
               "no all-zero weight")
    for p, msg in bad_sums[:8]:
        rec.fail(CKPT, "checksum", p, msg)
    if len(bad_sums) > 8:
        rec.fail(CKPT, "checksum", bad_sums[8][0], f"and {len(bad_sums) - 8} more differing files")
    if listed and not bad_sums:
        rec.ok(CKPT, "checksum", st.root,
               f"{count(len(listed), 'listed file')}: every sha256 matches{st.unlisted}")
    rec.report.stats["bytes_read"] = done
