#!/usr/bin/env bash
# The whole test suite, set-up included: works on a fresh Debian machine as root.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests drive: Debian's Chromium (browser tests) and Graphviz's `dot` (static SVG).
bash scripts/install-browser-deps.sh

python -m pip install -q --disable-pip-version-check -e ".[test]"

# pytest exits 5 when it collects nothing: that is a broken suite here, say so.
set +e
# Two workers: most tests wait on kernels and subprocesses, so two keep both cores busy.
python -m pytest -q -p no:cacheprovider -n 2 --durations=15 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: the suite is missing" >&2
  exit 1
fi
exit "$status"
