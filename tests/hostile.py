"""Running a hostile case through the command line, the way every corpus test checks it.

The contract for bad input: exactly one line on stderr, saying what and where, exit 1 (bad input)
or 2 (usage); never the CLI's catch-all (``internal error``), never a traceback.
"""

from __future__ import annotations

from longcat_tools.cli import main

CATCH_ALL = "internal error"


def refused(capsys, *args: object, code: int = 1, says: str | None = None) -> str:
    """Run ``longcat-tools ARGS`` expecting a refusal; returns its one error line. Pass ``-q``
    to commands that report progress on stderr."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert CATCH_ALL not in err and "Traceback" not in err, err
    assert rc == code, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if says is not None:
        assert says in lines[0], lines[0]
    return lines[0]
