"""``longcat-tools download`` and ``hub-manifest``: fetch a repo from the Hugging Face Hub, record
its file hashes, check what arrived."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from longcat_tools.cli._common import (
    JsonOpt,
    Out,
    QuietOpt,
    VerboseOpt,
    given_pathlib,
    human_bytes,
)

RepoArg = Annotated[str, typer.Argument(
    metavar="REPO_ID", help="Hub repo, org/name[@revision] (e.g. meituan-longcat/LongCat-Video).")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", show_default=False, help="Branch, tag or commit (default: main).")]


def download_cmd(
    repo: RepoArg,
    dst: Annotated[Path | None, typer.Option(
        "--dst", metavar="DIR", show_default=False, parser=given_pathlib,
        help="Download into this folder (real files) instead of the Hugging Face cache.")]
    = None,
    revision: RevisionOpt = None,
    include: Annotated[str | None, typer.Option(
        show_default=False, help="Components to fetch, comma-separated: dit, lora, vae, "
        "text_encoder, tokenizer, scheduler, or all (the default).")] = None,
    check_hashes: Annotated[bool, typer.Option(
        "--check-hashes", help="Afterwards, hash every file against the hub's sha256 (reads the "
        "whole download once more).")] = False,
    force_download: Annotated[bool, typer.Option(
        "--force-download", help="Fetch every selected file again, even if present (to replace "
        "corrupt copies).")] = False,
    max_workers: Annotated[int, typer.Option(min=1, help="Parallel file downloads.")] = 8,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> int:
    """Download a checkpoint from the Hugging Face Hub (resumable), then check its headers.

    The only command that downloads: every other command reads a repo id from the local cache.
    Under HF_HUB_OFFLINE=1 (or when the hub cannot be reached) it checks the copy already in the
    cache (or in --dst).
    """
    from longcat_tools.checkpoint import download as hub_download
    from longcat_tools.checkpoint import hub, hub_manifest
    from longcat_tools.errors import LongcatError

    out = Out(json_out, quiet, verbose)
    ref = hub.repo_ref(repo, revision)
    patterns = hub.include_patterns(include)
    if hub.offline():
        out.say(f"HF_HUB_OFFLINE=1: checking the copy of {ref} already on this machine")

    def on_plan(p: hub_download.Plan) -> None:
        out.say(f"{ref} @ {str(p.commit)[:12]}: {p.files} files, {human_bytes(p.bytes)} "
                f"-> {p.target}")
        if p.free_bytes is not None and p.free_bytes < p.bytes:
            out.warn(f"{human_bytes(p.free_bytes)} free at {p.target}, the selection is "
                     f"{human_bytes(p.bytes)} (files already there are not fetched again)")

    with ExitStack() as stack:
        def hash_progress(total: int):
            return stack.enter_context(out.progress(total, "sha256")).update

        r = hub_download.run(ref, dst=dst, patterns=patterns, check_hashes=check_hashes,
                             force=force_download, max_workers=max_workers, quiet=quiet,
                             on_plan=on_plan, hash_progress=hash_progress)
    if r.unreachable:
        out.warn(f"{r.unreachable}; checked the copy already on this machine instead")
    files = list(hub_manifest.local_files(r.path).values())
    size, broken = 0, []
    for p in files:  # a broken one is outside the selection: the download checked its own
        try:
            size += p.stat().st_size
        except FileNotFoundError:
            broken.append(p)
    if broken:
        out.warn(f"{len(broken)} file(s) of the copy outside the selection are broken links "
                 f"(e.g. {broken[0]}): fetch them again with --include and --force-download")
    h = r.headers
    rows = [["path", r.path], ["commit", r.commit or "?"], ["files", len(files)],
            ["size", human_bytes(size)], ["time", f"{r.seconds:.1f} s"]]
    if h.layout:
        dit = f"{h.dit_tensors:,} tensors, {h.dit_parameters:,} parameters in {h.dit_shards} shards"
        rows += [["layout", h.layout], ["DiT", dit]]
    rows.append(["safetensors headers", f"{h.safetensors_files} files ok"])
    if r.manifest_path:
        rows.append(["hub manifest", r.manifest_path])
    if r.hashes is not None:
        rows.append(["hashes", f"{'ok' if r.hashes.ok else 'FAILED'} ({r.hashes.source})"])
    out.table([[k, str(v)] for k, v in rows], ["", "value"])
    ok = r.hashes is None or r.hashes.ok
    if ok:
        out.say(f"\nready: pass `-m {ref if dst is None else r.path}` to any command")
    else:
        for c in r.hashes.failures:
            out.say(f"FAIL {c.status}: {c.message}")
        out.say("\nthe download does not match the hub: rerun `longcat-tools download` with "
                "--force-download (and --include for just the affected components)")
    out.result({"ok": ok, "repo_id": ref.repo_id, "revision": ref.revision, "commit": r.commit,
                "path": str(r.path), "include": patterns, "offline": r.local_only,
                "files": len(files), "bytes": size,
                "manifest": str(r.manifest_path) if r.manifest_path else None,
                "headers": h.as_dict(),
                "hashes": r.hashes.as_dict() if r.hashes is not None else None,
                "seconds": round(r.seconds, 3)})
    if not ok:  # the one error line every failure ends with (-q hid the FAIL lines above)
        first = r.hashes.failures[0].message
        raise LongcatError(f"{r.path}: {len(r.hashes.failures)} file(s) do not match the hub "
                           f"({first}); download again with --force-download")
    return 0


def hub_manifest_cmd(
    repo: RepoArg,
    out_file: Annotated[Path, typer.Option(
        "--out", metavar="FILE", parser=given_pathlib,
        help="Where to write the manifest JSON.")] = Path("hub_manifest.json"),
    revision: RevisionOpt = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Save the hub's file sizes and hashes of a repo, for `verify --against-hub` offline."""
    from longcat_tools.checkpoint import hub, hub_manifest
    from longcat_tools.errors import LongcatError, UsageError
    from longcat_tools.io.atomic import check_named, check_parent

    out = Out(json_out, quiet, verbose)
    ref = hub.repo_ref(repo, revision)
    check_named(out_file)  # all before the network: '' and a folder failed after the fetch
    if out_file.is_dir():
        raise UsageError(f"--out {out_file}: is a folder; name the manifest's file")
    check_parent(out_file)
    if out_file.exists() and not force:
        raise LongcatError(f"{out_file}: already exists (pass --force to replace it)")
    if hub.offline():
        raise LongcatError(f"{ref}: the hub's file list needs the network, and downloads are off "
                           "(HF_HUB_OFFLINE=1): run this on a machine with network")
    m = hub_manifest.fetch_manifest(ref.repo_id, ref.revision)
    hub_manifest.save_manifest(m, out_file)
    lfs = sum(1 for r in m.files.values() if r.sha256)
    total = sum(r.size or 0 for r in m.files.values())
    out.say(f"wrote {out_file}: {ref} @ {m.commit}, {len(m.files)} files ({lfs} LFS with sha256), "
            f"{human_bytes(total)}")
    out.result({"path": str(out_file), "repo_id": m.repo_id, "revision": ref.revision,
                "commit": m.commit, "files": len(m.files), "lfs_files": lfs, "bytes": total})
