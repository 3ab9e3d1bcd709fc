#!/bin/sh
# Gate a LongCat-Video checkpoint in CI or as a pre-commit hook: run `longcat-tools verify --json`,
# keep the report, print a short summary, and fail on a bad report.
#
#   usage: verify-checkpoint.sh [CHECKPOINT ...]
#     CHECKPOINT  a local folder or a Hugging Face repo id (org/name[@revision]) that is in the
#                 local cache; default: $LONGCAT_TOOLS_MODEL
#   environment:
#     LONGCAT_VERIFY_ARGS  extra arguments for verify, e.g. "--against-hub --manifest m.json"
#     LONGCAT_REPORT_DIR   where the JSON reports go (default: .)
#     LONGCAT_TOOLS        the command to run (default: longcat-tools)
#     PYTHON               the interpreter for the summary (default: python3; no jq needed)
#   exit status: 0 when every report is good; otherwise verify's own non-zero status (1 a bad
#   checkpoint, 2 a usage error), or 1 when verify exits 0 but its report is unreadable or
#   says "ok": false.
#
# As a pre-commit hook (.pre-commit-config.yaml):
#   - repo: local
#     hooks:
#       - id: verify-checkpoint
#         name: verify LongCat-Video checkpoint
#         entry: examples/ci/verify-checkpoint.sh checkpoints/longcat
#         language: script
#         pass_filenames: false
#         files: ^checkpoints/longcat/

set -u

TOOL=${LONGCAT_TOOLS:-longcat-tools}
PY=${PYTHON:-python3}
DIR=${LONGCAT_REPORT_DIR:-.}

if [ "$#" -eq 0 ]; then
    if [ -z "${LONGCAT_TOOLS_MODEL:-}" ]; then
        echo "verify-checkpoint: name a checkpoint (folder or org/name repo id) or set" \
             "LONGCAT_TOOLS_MODEL" >&2
        exit 2
    fi
    set -- "$LONGCAT_TOOLS_MODEL"
fi
mkdir -p "$DIR" || exit 2

status=0
for ckpt in "$@"; do
    report="$DIR/$(printf '%s' "$ckpt" | tr -c 'A-Za-z0-9._-' '_').verify.json"
    # shellcheck disable=SC2086  # LONGCAT_VERIFY_ARGS is a list of words on purpose
    "$TOOL" verify "$ckpt" --json ${LONGCAT_VERIFY_ARGS:-} > "$report"
    rc=$?
    "$PY" - "$report" "$rc" "$ckpt" <<'PY'
import json
import sys

path, rc, ckpt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
GOOD = {"ok", "pass", "passed", "skipped", "not-downloaded", "extra", "info", "warn", "warning"}


def problems(node, out):
    """Every object with a non-good "status" anywhere in the report."""
    if isinstance(node, dict):
        status = node.get("status")
        if isinstance(status, str) and status.lower() not in GOOD:
            out.append(node)
        for value in node.values():
            problems(value, out)
    elif isinstance(node, list):
        for value in node:
            problems(value, out)
    return out


try:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
except (OSError, ValueError) as e:
    print(f"FAIL {ckpt}: no readable JSON report from verify (exit {rc}): {e}")
    sys.exit(rc or 1)
bad = problems(doc, [])
ok = rc == 0 and not (isinstance(doc, dict) and doc.get("ok") is False)
print(f"{'PASS' if ok else 'FAIL'} {ckpt}: verify exit {rc}, {len(bad)} problem(s), "
      f"report {path}")
for item in bad[:20]:
    what = item.get("message") or item.get("name") or item.get("file") or json.dumps(item)
    print(f"  - [{item['status']}] {what}")
if len(bad) > 20:
    print(f"  ... and {len(bad) - 20} more (see the report)")
sys.exit(0 if ok else (rc or 1))
PY
    code=$?
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$code
    fi
done
exit "$status"
