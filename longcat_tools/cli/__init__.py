"""The ``longcat-tools`` command line: a thin shell over the library.

Exit codes: 0 ok, 1 a check failed or the input is bad, 2 usage error. Errors are one line on
stderr; ``-v`` adds the traceback. Under ``--json`` a command that fails before printing its
result prints ``{"error": ..., "exit_code": ...}`` on stdout instead, so that stdout always holds
one JSON document.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
import traceback

import typer

from longcat_tools import __version__
from longcat_tools.cli._common import JSON_STATE, shown
from longcat_tools.cli.bsa import bsa_app
from longcat_tools.cli.compare import compare_cmd
from longcat_tools.cli.convert import convert_cmd
from longcat_tools.cli.demo import demo_cmd
from longcat_tools.cli.download import download_cmd, hub_manifest_cmd
from longcat_tools.cli.lora import lora_app
from longcat_tools.cli.run import run_cmd
from longcat_tools.cli.schema import schema_cmd
from longcat_tools.cli.synth import synth_cmd
from longcat_tools.cli.verify import verify_cmd
from longcat_tools.errors import EXIT_FAIL, EXIT_USAGE, LongcatError
from longcat_tools.io import jsonio

app = typer.Typer(
    name="longcat-tools", no_args_is_help=True, add_completion=False,
    pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Convert, verify, configure and run LongCat-Video checkpoints.",
)
app.command("synth")(synth_cmd)
app.command("demo")(demo_cmd)
app.command("convert")(convert_cmd)
app.command("verify")(verify_cmd)
app.command("schema")(schema_cmd)
app.add_typer(bsa_app, name="bsa")
app.command("download")(download_cmd)
app.command("hub-manifest")(hub_manifest_cmd)
app.add_typer(lora_app, name="lora")
app.command("run")(run_cmd)
app.command("compare")(compare_cmd)


def _version(value: bool) -> None:
    if value:
        print(f"longcat-tools {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Convert, verify, configure and run LongCat-Video checkpoints."""


def _is_click_error(e: Exception) -> bool:
    # Typer may vendor its own click, so match click's exception protocol rather than its class.
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "show")


def _click_message(e: Exception) -> str:
    """Click's message, and where a command went wrong the help to read (click prints usage,
    a hint and the message over four lines)."""
    message = e.format_message().rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    return f"{message} (see '{ctx.command_path} --help')" if ctx is not None else message


def _system_problem(e: Exception) -> tuple[str, int] | None:
    """(line, exit code) for what the system refused, wherever a command first met it: a path
    it cannot take at all (a name over the file system's limit, a NUL character, which Python
    refuses before the system call), a read-only file system, or a full disk or quota (the
    output is left as the command's atomic writes leave it: not there)."""
    if isinstance(e, ValueError) and "embedded null byte" in str(e):
        return "a path contains a NUL character; remove it", EXIT_USAGE
    if not isinstance(e, OSError):
        return None
    where = e.filename or "a file"
    if e.errno == errno.ENAMETOOLONG:
        return (f"{where}: the path or a name in it is too long for the file system; use a "
                "shorter one"), EXIT_USAGE
    if e.errno == errno.EROFS:
        return f"{where}: on a read-only file system; write elsewhere", EXIT_USAGE
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{where}: the disk (or quota) filled while writing; free space or write "
                "elsewhere"), EXIT_FAIL
    return None


class _WarningLines(logging.Handler):
    """The library's warnings (BSA, fp8, ...) as the commands' own: ``warning: ...`` on stderr,
    control characters escaped. Python's fallback printed them bare."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")  # a bar on screen steps aside for the line, then redraws
        with tqdm.tqdm.external_write_mode(file=sys.stderr) if tqdm else contextlib.nullcontext():
            print(f"warning: {shown(record.getMessage(), True)}", file=sys.stderr, flush=True)


def _error_line(message: str) -> None:
    """The one line every failure ends with; a name holding a line break cannot split it."""
    print(f"error: {shown(message, one_line=True)}", file=sys.stderr)


def _route_warnings() -> None:
    logger = logging.getLogger("longcat_tools")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        logger.addHandler(_WarningLines(logging.WARNING))


def _clear_progress() -> None:
    """Close the progress bars an error left open (a step bar the exception went through), so
    that the error starts its own line instead of ending the bar's."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


class Terminated(BaseException):
    """SIGTERM (CI cancelling a job, ``docker stop``, ``timeout``) raised in the main thread, so
    a writer unwinds as on Ctrl-C: its scratch folder and lock removed, nothing half-written.
    A BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM raises :class:`Terminated` while the command runs (main thread only), and the
    handler before it comes back after."""
    try:
        before = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        before = None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every failure into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args or "--verbose" in args
    JSON_STATE.update(on=None, printed=False)
    _route_warnings()

    def fail(message: str, code: int) -> int:
        on = JSON_STATE["on"] if JSON_STATE["on"] is not None else "--json" in args
        if on and not JSON_STATE["printed"]:
            try:
                print(jsonio.dumps({"error": message, "exit_code": code}, newline=False),
                      flush=True)
            except (OSError, ValueError):  # stdout closed or full: the exit code remains
                pass
        return code

    try:  # obj: the command line as given, for commands that start it again (run --gpus)
        try:
            with _sigterm_unwinds():
                rv = app(args=args, prog_name="longcat-tools", standalone_mode=False,
                         obj={"argv": args})
        finally:
            _clear_progress()
    except Terminated:
        print("terminated", file=sys.stderr)
        return fail("terminated", 128 + signal.SIGTERM)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return fail("aborted", 130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return fail("interrupted", 130)
    except LongcatError as e:
        if verbose:
            traceback.print_exc()
        _error_line(str(e))
        return fail(str(e), e.exit_code)
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a bare traceback
        if _is_click_error(e) and type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # a group without its command: the help, as asked
            return fail(e.format_message(), e.exit_code)
        if _is_click_error(e):  # usage errors: click's message on one line, exit 2
            message = _click_message(e)
            _error_line(message)
            return fail(message, e.exit_code)
        if verbose:
            traceback.print_exc()
        if (problem := _system_problem(e)) is not None:
            _error_line(problem[0])
            return fail(*problem)
        message = f"internal error: {type(e).__name__}: {e}"
        _error_line(f"{message} (rerun with -v for the traceback)")
        return fail(message, EXIT_FAIL)
    if rv == 130:  # Typer turns Ctrl-C inside a command into exit code 130, silently
        print("interrupted", file=sys.stderr)
        return fail("interrupted", 130)
    return rv if isinstance(rv, int) else 0
