#!/usr/bin/env bash
# Does qdiff still pass its tests with the newest releases its pyproject.toml allows?
#
#   bash scripts/check_latest.sh            # scratch venv, newest allowed releases (no constraints), full test suite
#   bash scripts/check_latest.sh --update   # the same, then (only if the suite passed) rewrite constraints.txt
#   bash scripts/check_latest.sh --freeze   # no install, no tests: rewrite constraints.txt from the active venv
#
# The README's install commands and .ci/run install with `-c constraints.txt`: the exact versions the suite last
# passed with, so a new release of any dependency cannot change what a fresh machine installs. This script is how a
# breaking release is found by a command instead of by a user: it installs `.[test]` into a new venv in a temp
# folder WITHOUT the constraints file, runs `python -m pytest -q` from the repository root (where users start), and
# prints which installed versions differ from constraints.txt. After a green run, `--update` writes the new set;
# commit it with the suite's result (docs/developer-guide.md, "Dependencies").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

freeze() {  # the active venv's distributions, pinned; qdiff itself (editable) and pip are not constraints
  {
    echo "# Exact versions qdiff's test suite passed with; used by README's install commands and .ci/run"
    echo "# (pip install -c constraints.txt ...). Written by scripts/check_latest.sh on $(date -u +%F),"
    echo "# $(python -c 'import platform; print(platform.python_implementation(), platform.python_version(), platform.machine())')."
    echo "# pyproject.toml keeps the compatible ranges for installs without this file."
    pip freeze --all --exclude-editable | grep -viE '^(pip|qdiff)==' | LC_ALL=C sort -f
  } > "$1"
}

case "${1:-}" in
  --freeze) freeze constraints.txt; echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"; exit 0 ;;
  ""|--update) ;;
  *) echo "usage: bash scripts/check_latest.sh [--update | --freeze]" >&2; exit 2 ;;
esac

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "== scratch venv in $scratch (newest allowed releases, no constraints file)"
python3 -m venv "$scratch/venv"
# shellcheck disable=SC1091
. "$scratch/venv/bin/activate"
pip install -q -e ".[test]"
freeze "$scratch/latest.txt"
echo "== versions that differ from constraints.txt (< pinned, > newest)"
diff <(grep '==' constraints.txt) <(grep '==' "$scratch/latest.txt") || true
echo "== test suite (python -m pytest -q, from $root)"
status=0
python -m pytest -q || status=$?
if [ "$status" -ne 0 ]; then
  echo "check_latest: the suite FAILED with the newest releases (exit $status); constraints.txt is unchanged" >&2
  exit "$status"
fi
if [ "${1:-}" = "--update" ]; then
  cp "$scratch/latest.txt" constraints.txt
  echo "check_latest: the suite passed; constraints.txt now pins the newest releases (review and commit it)"
else
  echo "check_latest: the suite passed with the newest releases"
fi
