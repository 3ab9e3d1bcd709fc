#!/usr/bin/env python3
"""Regenerate tests/golden/fastvideo/ from FastVideo's own LongCat converter.

A tool run BY HAND, never in CI (it needs git and a FastVideo checkout or network access). It
pins what ``tests/test_golden_fastvideo.py`` compares our ``convert`` against:

1. ``longcat-tools synth NATIVE --preset tiny --seed 0`` (our synth, through the installed CLI);
2. FastVideo's ``scripts/checkpoint_conversion/longcat_to_fastvideo.py --source NATIVE --output
   FV --validate``, run from a FastVideo checkout at the pinned commit with ``--python`` (default:
   this interpreter; the script needs only torch, safetensors and tqdm, no ``fastvideo`` import);
3. writes, under ``--out`` (default: ``tests/golden/fastvideo/`` next to this file):

   - ``inputs.json``: sha256 and size of every file synth wrote (tells a test that synth drifted);
   - ``tensors.json``: for ``transformer``, ``lora/distilled`` and ``lora/refinement`` the files
     FastVideo wrote, their safetensors ``__metadata__``, and per tensor dtype, shape and the
     sha256 of its raw bytes as stored (little-endian, row-major);
   - ``outputs.json``: every file FastVideo wrote, sha256 and size, and for the components it
     copies (vae, text_encoder, tokenizer, scheduler) the input file it is a copy of;
   - ``json/``: the JSON files FastVideo wrote (``model_index.json``, ``transformer/config.json``)
     byte for byte;
   - ``provenance.json``: FastVideo commit, the exact commands, tool and library versions.

Nothing of FastVideo's code is copied into this repository; only its output's digests.

Usage::

    python tests/golden/generate_fastvideo.py                       # clones FastVideo at the pin
    python tests/golden/generate_fastvideo.py --fastvideo ~/src/FastVideo   # an existing checkout
    python tests/golden/generate_fastvideo.py --keep /tmp/fvgold    # keep the synth'd and FV trees

Then review ``git diff tests/golden/fastvideo`` and update README.md there if the pin changed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from importlib import metadata as _md
from pathlib import Path

from longcat_tools.io.checksums import sha256_file

FASTVIDEO_URL = "https://github.com/hao-ai-lab/FastVideo"
FASTVIDEO_COMMIT = "2f3d4074064e4d86f99dc784ebbaa296e6f5925f"  # main, 2026-08-21
CONVERTER = "scripts/checkpoint_conversion/longcat_to_fastvideo.py"
SYNTH_ARGS = ["--preset", "tiny", "--seed", "0"]
TENSOR_DIRS = ["transformer", "lora/distilled", "lora/refinement"]
JSON_FILES = ["model_index.json", "transformer/config.json"]
COPIED_COMPONENTS = ["vae", "text_encoder", "tokenizer", "scheduler"]


def read_safetensors(path: Path) -> tuple[dict, dict[str, dict]]:
    """(metadata, {name: {dtype, shape, sha256}}) read from the raw file, no library involved."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        tensors[name] = {"dtype": info["dtype"], "shape": info["shape"],
                         "sha256": hashlib.sha256(raw[base + start:base + end]).hexdigest()}
    return meta, tensors


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def git_head(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def clone(url: str, commit: str, dst: Path) -> Path:
    """A checkout of ``commit``: a shallow fetch of that commit (GitHub allows it); where the
    server refuses a fetch by hash (a plain local repository), a full clone without checkout,
    from which only the converter is written out (it imports nothing from FastVideo)."""
    subprocess.run(["git", "init", "-q", str(dst)], check=True)
    fetch = subprocess.run(["git", "-C", str(dst), "fetch", "-q", "--depth", "1", url, commit])
    if fetch.returncode == 0:
        subprocess.run(["git", "-C", str(dst), "checkout", "-q", "FETCH_HEAD"], check=True)
        return dst
    shutil.rmtree(dst)
    subprocess.run(["git", "clone", "-q", "--no-checkout", url, str(dst)], check=True)
    subprocess.run(["git", "-C", str(dst), "update-ref", "--no-deref", "HEAD", commit], check=True)
    text = subprocess.run(["git", "-C", str(dst), "show", f"{commit}:{CONVERTER}"], check=True,
                          capture_output=True).stdout
    (dst / CONVERTER).parent.mkdir(parents=True, exist_ok=True)
    (dst / CONVERTER).write_bytes(text)
    return dst


def version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fastvideo", type=Path, help="existing FastVideo checkout (else cloned)")
    ap.add_argument("--commit", default=FASTVIDEO_COMMIT, help="FastVideo commit to pin")
    ap.add_argument("--url", default=FASTVIDEO_URL, help="FastVideo repository to clone")
    ap.add_argument("--allow-other-commit", action="store_true",
                    help="accept a --fastvideo checkout whose HEAD is not --commit")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for FastVideo's converter (torch, safetensors, tqdm)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "fastvideo")
    ap.add_argument("--keep", type=Path, help="write the work trees here and keep them")
    args = ap.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="fvgold."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.fastvideo:
            fv_repo = args.fastvideo.resolve()
        else:
            fv_repo = clone(args.url, args.commit, work / "FastVideo")
        head = git_head(fv_repo)
        if head != args.commit and not args.allow_other_commit:
            print(f"error: {fv_repo} is at {head}, not the pinned {args.commit} "
                  "(--allow-other-commit to accept it)", file=sys.stderr)
            return 1

        native, fv_out = work / "native", work / "fastvideo-out"
        for p in (native, fv_out):
            if p.exists():
                shutil.rmtree(p)
        synth_cmd = [sys.executable, "-m", "longcat_tools", "synth", str(native), *SYNTH_ARGS, "-q"]
        subprocess.run(synth_cmd, check=True)
        conv_cmd = [args.python, CONVERTER, "--source", str(native), "--output", str(fv_out),
                    "--validate"]
        log = subprocess.run(conv_cmd, cwd=fv_repo, capture_output=True, text=True)
        if log.returncode != 0:
            sys.stderr.write(log.stdout + log.stderr)
            print(f"error: FastVideo's converter exited {log.returncode}", file=sys.stderr)
            return 1

        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        inputs = {rel: {"sha256": sha256_file(native / rel), "size": (native / rel).stat().st_size}
                  for rel in files_under(native)}
        outputs = {}
        for rel in files_under(fv_out):
            entry = {"sha256": sha256_file(fv_out / rel), "size": (fv_out / rel).stat().st_size}
            if rel.split("/")[0] in COPIED_COMPONENTS and rel in inputs:
                entry["copy_of_input"] = rel
                assert inputs[rel]["sha256"] == entry["sha256"], rel
            outputs[rel] = entry
        tensors = {}
        for sub in TENSOR_DIRS:
            files = sorted(p.name for p in (fv_out / sub).glob("*.safetensors"))
            group = {"files": files, "metadata": {}, "tensors": {}}
            for name in files:
                meta, ts = read_safetensors(fv_out / sub / name)
                group["metadata"][name] = meta
                for tname, info in ts.items():
                    group["tensors"][tname] = {**info, "file": name}
            group["tensors"] = dict(sorted(group["tensors"].items()))
            tensors[sub] = group
        for rel in JSON_FILES:
            dst = out / "json" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fv_out / rel, dst)

        def rel_cmd(cmd: list[str]) -> str:
            s = " ".join(cmd).replace(str(work), "$WORK").replace(sys.executable, "python")
            return s.replace(args.python, "python")

        provenance = {
            "fastvideo": {"url": args.url, "commit": head, "converter": CONVERTER},
            "commands": {"synth": rel_cmd(synth_cmd),
                         "fastvideo": f"(cd FastVideo && {rel_cmd(conv_cmd)})"},
            "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "versions": {"python": platform.python_version(),
                         **{d: version(d) for d in ("longcat-tools", "torch", "safetensors",
                                                    "numpy", "tqdm")}},
        }
        for name, data in [("inputs.json", inputs), ("outputs.json", outputs),
                           ("tensors.json", tensors), ("provenance.json", provenance)]:
            (out / name).write_text(json.dumps(data, indent=1) + "\n")
        n_tensors = sum(len(g["tensors"]) for g in tensors.values())
        print(f"wrote {out} (FastVideo {head[:12]}; {n_tensors} tensors, "
              f"{len(outputs)} output files)")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
