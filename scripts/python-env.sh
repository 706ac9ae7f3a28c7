#!/usr/bin/env bash
# Create/refresh the Python virtualenv used by celeriac's test tooling.
#
#   scripts/python-env.sh            # prints the venv python path (last line)
#
# The venv lives at $REPO/target/pyenv. It is (re)installed from
# scripts/python-requirements.txt only when the venv is missing/broken or the
# stamp file target/pyenv/.celeriac-stamp differs from the requirements file,
# so repeated runs are fast no-ops.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/target/pyenv"
PY="$VENV/bin/python"
REQS="$REPO/scripts/python-requirements.txt"
STAMP="$VENV/.celeriac-stamp"
PYTHON3="${PYTHON3:-python3}"

log() { echo "python-env: $*" >&2; }

need_install=0
if [[ ! -x "$PY" ]] || ! "$PY" -c 'import sys' >/dev/null 2>&1; then
    log "creating virtualenv at $VENV"
    mkdir -p "$REPO/target"
    "$PYTHON3" -m venv --clear "$VENV"
    need_install=1
elif [[ ! -f "$STAMP" ]] || ! cmp -s "$STAMP" "$REQS"; then
    need_install=1
fi

if [[ "$need_install" == 1 ]]; then
    log "installing $REQS"
    rm -f "$STAMP"
    "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQS" >&2
    cp "$REQS" "$STAMP"
fi

echo "$PY"
