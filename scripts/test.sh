#!/usr/bin/env bash
# Run the whole suite. pytest exits 5 when it collected nothing: that is a failure here,
# so CI can never pass on an empty run.
set -uo pipefail
cd "$(dirname "$0")/.."
# The architecture's layers and contracts (pyproject.toml [tool.importlinter]) first: a violation fails CI.
.venv/bin/lint-imports || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ERROR: no tests were collected" >&2
  exit 1
fi
exit "$rc"
