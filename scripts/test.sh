#!/usr/bin/env bash
# The whole test suite, set-up included: works on a fresh Debian machine as root.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests drive: Debian's Chromium (browser tests) and Graphviz's `dot` (static SVG).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v dot >/dev/null 2>&1 || missing+=(graphviz)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} with apt-get" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python -m pip install -q --disable-pip-version-check -e ".[test]"

# pytest exits 5 when it collects nothing: that is a broken suite here, say so.
set +e
python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: the suite is missing" >&2
  exit 1
fi
exit "$status"
