#!/usr/bin/env bash
# The README's commands, as a new user runs them: a brand-new venv (`python3 -m venv`,
# activated), then the README's first command VERBATIM (read from README.md's first
# ```sh block, so the README and CI cannot drift) with its exit status checked, then
# every example notebook from the console (`flowmagic run NB`) with its expected exit
# status: parameter_flow and timeout_flow fail on purpose. (Run All of each example in
# a real kernel is in the pytest suite: tests/test_magics_kernel.py, and
# tests/test_environments.py for conda_example.) The README's second command must be
# `bash scripts/test.sh` and .ci/run must exec exactly it.
#
# Usage: bash scripts/readme-commands.sh [python]   (default: python3 on PATH)
# The venv is .venvs/readme (git-ignored, made again on every run); flows write to a
# throwaway FLOWMAGIC_HOME, removed at the end. The last line reads
# "readme-commands: N passed, N failed"; the exit status is 1 when a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
venv=$PWD/.venvs/readme

passed=0
failed=0
check() {  # check DESCRIPTION EXPECTED-STATUS ACTUAL-STATUS
  if [ "$2" -eq "$3" ]; then
    passed=$((passed + 1)); echo "readme-commands: ok      $1 (exit $3)"
  else
    failed=$((failed + 1)); echo "readme-commands: FAILED  $1: exit $3, expected $2" >&2
  fi
}
finish() {
  echo "readme-commands: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

# The README's ```sh blocks: the first is the example command, the second the test command.
blocks=$(awk '/^```sh[[:space:]]*$/ { inside = 1; n++; next }
              /^```/ && inside { inside = 0; next }
              inside { print n ": " $0 }' README.md)
first=$(sed -n 's/^1: //p' <<<"$blocks")
second=$(sed -n 's/^2: //p' <<<"$blocks")
if [ -z "$first" ]; then
  echo "readme-commands: README.md has no \`\`\`sh block: nothing to run" >&2
  failed=1; finish; exit 1
fi
if [ "$second" = "bash scripts/test.sh" ] && grep -qx 'exec bash scripts/test.sh' .ci/run; then
  check "README's second command is what .ci/run execs: $second" 0 0
else
  echo "readme-commands: README's second command is '$second'; .ci/run must exec exactly it" >&2
  check "README's second command matches .ci/run" 0 1
fi

rm -rf "$venv"
"$python" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
FLOWMAGIC_HOME=$(mktemp -d "${TMPDIR:-/tmp}/flowmagic-readme.XXXXXX")
export FLOWMAGIC_HOME
trap 'rm -rf "$FLOWMAGIC_HOME"' EXIT
echo "readme-commands: $(python --version) in $venv, FLOWMAGIC_HOME=$FLOWMAGIC_HOME"

echo "readme-commands: \$ $first"
set +e
bash -c "$first"
status=$?
set -e
check "the README's first command: $first" 0 "$status"
if ! command -v flowmagic >/dev/null; then
  echo "readme-commands: the first command left no flowmagic on PATH: the examples cannot run" >&2
  failed=$((failed + 1)); finish; exit 1
fi

# Each example from the console, with the exit status it must end with (1: fails on purpose).
declare -A expected=(
  [hello_flow]=0 [catch_flow]=0 [retry_flow]=0 [conda_example]=0 [model_selection]=0
  [parameter_flow]=1 [timeout_flow]=1
)
for notebook in example_notebooks/*.ipynb; do
  name=$(basename "$notebook" .ipynb)
  if [ -z "${expected[$name]:-}" ]; then
    echo "readme-commands: $notebook is new: give it its expected exit status in $0" >&2
    failed=$((failed + 1)); continue
  fi
  [ "$name" = model_selection ] && grep -qF "flowmagic run $notebook" <<<"$first" && continue  # ran above
  echo "readme-commands: \$ flowmagic run $notebook"
  set +e
  flowmagic run "$notebook"
  status=$?
  set -e
  check "flowmagic run $notebook" "${expected[$name]}" "$status"
done
finish
