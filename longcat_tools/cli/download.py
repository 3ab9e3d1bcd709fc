"""``longcat-tools download`` and ``hub-manifest``: fetch a repo from the Hugging Face Hub, record
its file hashes, check what arrived."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from longcat_tools.cli._common import JsonOpt, Out, QuietOpt, VerboseOpt, human_bytes

RepoArg = Annotated[str, typer.Argument(
    metavar="REPO_ID", help="Hub repo, org/name[@revision] (e.g. meituan-longcat/LongCat-Video).")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", show_default=False, help="Branch, tag or commit (default: main).")]


def _ref(repo: str, revision: str | None):
    from longcat_tools.errors import UsageError
    from longcat_tools.hub import RepoRef, parse_repo_ref

    ref = parse_repo_ref(repo)
    if ref is None:
        raise UsageError(f"'{repo}' is not a Hugging Face repo id (expected org/name[@revision], "
                         "e.g. meituan-longcat/LongCat-Video)")
    if revision and ref.revision and revision != ref.revision:
        raise UsageError(f"two revisions given: '{ref.revision}' in {repo} and --revision "
                         f"'{revision}'")
    return RepoRef(ref.repo_id, revision or ref.revision)


def download_cmd(
    repo: RepoArg,
    dst: Annotated[Path | None, typer.Option(
        "--dst", show_default=False, help="Download into this folder (real files) instead of the "
        "Hugging Face cache.")] = None,
    revision: RevisionOpt = None,
    include: Annotated[str | None, typer.Option(
        show_default=False, help="Components to fetch, comma-separated: dit, lora, vae, "
        "text_encoder, tokenizer, scheduler (default: all).")] = None,
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
    Under HF_HUB_OFFLINE=1 it checks the copy already in the cache (or in --dst).
    """
    from longcat_tools import hub, hub_manifest

    out = Out(json_out, quiet, verbose)
    ref = _ref(repo, revision)
    patterns = hub.include_patterns(include)
    t0 = time.perf_counter()
    manifest = None
    fetch_ref = ref
    if hub.offline():
        out.say(f"HF_HUB_OFFLINE=1: checking the copy of {ref} already on this machine")
    else:
        manifest = hub_manifest.fetch_manifest(ref.repo_id, ref.revision)
        manifest.include = patterns
        _say_plan(out, ref, manifest, patterns, dst)
        if dst is not None and manifest.commit:  # a folder has no refs: pin what we listed
            fetch_ref = hub.RepoRef(ref.repo_id, manifest.commit)
    path = hub.download(fetch_ref, dst=dst, patterns=patterns, max_workers=max_workers,
                        quiet=quiet, force=force_download)
    fetched = time.perf_counter() - t0
    found = hub.snapshot_repo(path)
    commit = found[0].revision if found else (manifest.commit if manifest else None)
    saved = None
    if manifest is not None:
        if commit and manifest.commit != commit:  # the branch moved while we downloaded
            manifest = hub_manifest.fetch_manifest(ref.repo_id, commit)
            manifest.include = patterns
        manifest.revision = ref.revision
        saved = hub_manifest.save_manifest(
            manifest, hub_manifest.saved_manifest_path(path, manifest.commit))
    out.say(f"checking headers in {path} ...")
    summary = hub.check_headers(path, patterns)
    report = _hash_check(out, path, ref, manifest) if check_hashes else None
    files = list(hub_manifest.local_files(path).values())
    size = sum(p.stat().st_size for p in files)
    rows = [["path", path], ["commit", commit or "?"], ["files", len(files)],
            ["size", human_bytes(size)], ["time", f"{fetched:.1f} s"]]
    if summary.layout:
        rows += [["layout", summary.layout],
                 ["DiT", f"{summary.dit_tensors:,} tensors, {summary.dit_parameters:,} parameters "
                  f"in {summary.dit_shards} shards"]]
    rows.append(["safetensors headers", f"{summary.safetensors_files} files ok"])
    if saved:
        rows.append(["hub manifest", saved])
    if report is not None:
        rows.append(["hashes", f"{'ok' if report.ok else 'FAILED'} ({report.source})"])
    out.table([[k, str(v)] for k, v in rows], ["", "value"])
    ok = report is None or report.ok
    if ok:
        use = str(ref) if dst is None else str(path)
        out.say(f"\nready: pass `-m {use}` to any command")
    else:
        for c in report.failures:
            out.say(f"FAIL {c.status}: {c.message}")
        out.say("\nthe download does not match the hub: rerun `longcat-tools download` with "
                "--force-download (and --include for just the affected components)")
    out.result({"ok": ok, "repo_id": ref.repo_id, "revision": ref.revision, "commit": commit,
                "path": str(path), "include": patterns, "offline": hub.offline(),
                "files": len(files), "bytes": size,
                "manifest": str(saved) if saved else None, "headers": summary.as_dict(),
                "hashes": report.as_dict() if report is not None else None,
                "seconds": round(time.perf_counter() - t0, 3)})
    return 0 if ok else 1


def _say_plan(out: Out, ref, manifest, patterns, dst) -> None:
    from huggingface_hub.utils import filter_repo_objects

    from longcat_tools import hub

    chosen = list(filter_repo_objects(list(manifest.files), allow_patterns=patterns))
    total = sum(manifest.files[f].size or 0 for f in chosen)
    where = dst or hub.cache_dir()
    out.say(f"{ref} @ {str(manifest.commit)[:12]}: {len(chosen)} files, {human_bytes(total)} "
            f"-> {where}")
    free = hub.free_bytes(Path(where))
    if free is not None and free < total:
        out.warn(f"{human_bytes(free)} free at {where}, the selection is {human_bytes(total)} "
                 "(files already there are not fetched again)")


def _hash_check(out: Out, path: Path, ref, manifest):
    from longcat_tools import hub_manifest

    m = manifest or hub_manifest.expected_files(path, ref.repo_id, ref.revision)
    with out.progress(hub_manifest.bytes_to_hash(path, m), "sha256") as bar:
        checks = hub_manifest.compare_with_manifest(path, m, progress=bar.update)
    return hub_manifest.HubReport(m.repo_id, m.commit, m.source, m.complete, checks)


def hub_manifest_cmd(
    repo: RepoArg,
    out_file: Annotated[Path, typer.Option(
        "--out", help="Where to write the manifest JSON.")] = Path("hub_manifest.json"),
    revision: RevisionOpt = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Save the hub's file sizes and hashes of a repo, for `verify --against-hub` offline."""
    from longcat_tools import hub, hub_manifest
    from longcat_tools.errors import LongcatError

    out = Out(json_out, quiet, verbose)
    ref = _ref(repo, revision)
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
