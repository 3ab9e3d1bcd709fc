"""``longcat-tools verify``: check a checkpoint and exit 0 (pass), 1 (fail) or 2 (usage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from longcat_tools.cli._common import (
    JsonOpt,
    ModelOpt,
    Out,
    QuietOpt,
    VerboseOpt,
    given_path,
    given_pathlib,
)


def verify_cmd(
    path: Annotated[str | None, typer.Argument(
        metavar="PATH", show_default=False, parser=given_path,
        help="Checkpoint folder, or a ComfyUI single-file DiT (default: --model, "
             "$LONGCAT_TOOLS_MODEL, else the current folder).")] = None,
    model: ModelOpt = None,
    deep: Annotated[bool, typer.Option(
        "--deep", help="Also read every byte once: NaN/Inf, all-zero weights, sha256 against "
                       "checksums.sha256.")] = False,
    checksums: Annotated[Path | None, typer.Option(
        metavar="FILE", parser=given_pathlib,
        help="sha256sum-format list to compare with (default: checksums.sha256 "
                             "in the checkpoint); implies --deep.")] = None,
    strict: Annotated[bool, typer.Option(help="Warnings fail too (exit 1).")] = False,
    against_hub: Annotated[bool, typer.Option(
        "--against-hub", help="Also compare every file with the hub's sizes and hashes.")]
    = False,
    manifest: Annotated[Path | None, typer.Option(
        metavar="FILE", parser=given_pathlib,
        help="The hub's record to compare with (`hub-manifest`); implies "
                             "--against-hub.")] = None,
    repo: Annotated[str | None, typer.Option(
        metavar="REPO_ID[@REV]", help="Which hub repo the folder is a copy of (default: from the "
                                      "cache or a saved manifest); implies --against-hub.")]
    = None,
    forward: Annotated[bool, typer.Option(
        "--forward", help="Also run one small DiT forward through the reference runner.")]
    = False,
    against: Annotated[str | None, typer.Option(
        metavar="OTHER", parser=given_path,
        help="With --forward: compare the output with this checkpoint's.")]
    = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Check that a checkpoint is complete, consistent and sound (any layout; the CI gate)."""
    from longcat_tools import __version__
    from longcat_tools.checkpoint.layouts import resolve_model
    from longcat_tools.errors import LongcatError, UsageError
    from longcat_tools.verify import verify
    from longcat_tools.verify.checkpoint import is_avatar, is_comfy
    from longcat_tools.verify.forward import forward_checker

    if path and model and Path(path) != Path(model):
        raise UsageError(f"two checkpoints given ({path} and --model {model}); pass one")
    if against and not forward:
        raise UsageError("--against needs --forward")
    root = resolve_model(path or model)
    if forward and is_comfy(root):
        raise UsageError(f"{root}: --forward runs what `run` loads; a ComfyUI single-file DiT "
                         "runs in ComfyUI (convert it to run it here)")
    if forward and is_avatar(root):
        raise UsageError(f"{root}: --forward probes the base model's DiT; an avatar checkpoint's "
                         "(with its audio layers) is not probed: drop --forward")
    check_forward = forward_checker() if forward else None  # UsageError when no runner
    out = Out(json_out, quiet, verbose)
    hashing = deep or checksums or against_hub or manifest or repo
    bar = out.progress(None, "verify (reading every byte)") if hashing else None

    def progress(done: int, total: int) -> None:
        if bar.total != total:  # the next pass (deep, then hub) starts its own count
            bar.reset(total=total)
        bar.update(done - bar.n)

    try:
        report = verify(root, deep=deep, checksums=checksums, strict=strict,
                        against_hub=against_hub, manifest=manifest, repo=repo,
                        progress=progress if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if check_forward is not None:
        check_forward(report, root, against)
    where = report.layout or "unknown layout"
    if report.flavour and report.layout != "native":
        where += f", {report.flavour} keys"
    out.say(f"verify {root}: {where}, {'deep' if report.deep else 'header level'}")
    out.table([[c.status, c.component, c.name, c.file, c.message] for c in report.checks],
              ["status", "component", "check", "file", "message"])
    counts = {s: report.count(s) for s in ("fail", "warn", "pass")}
    out.say(f"{report.status.upper()}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            + f" ({report.seconds:.2f} s)")
    out.result(report.to_json(tool=f"longcat-tools {__version__}"))
    bad = report.failures()
    if bad:
        first = bad[0]
        what = "failed check" if first.status == "fail" else "warning"
        which = f"first of {len(bad)} {what}s" if len(bad) > 1 else f"1 {what}"
        which += "" if first.status == "fail" else ", --strict"
        where = Path(root) / first.file if first.file != "." else root
        raise LongcatError(f"{where}: {first.message} [verify: {which}]")
