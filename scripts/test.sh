#!/usr/bin/env bash
# The whole test suite, set-up included: works on a fresh Debian machine as root.
#
# Usage: bash scripts/test.sh [pytest args...]
#
# It installs like a user and never uses the global interpreter's packages:
#   1. Debian's chromium and graphviz when missing (scripts/install-browser-deps.sh);
#   2. uv, into a small bootstrap venv (.venvs/uv, `python3.11 -m venv` + pip), so
#      uv need not be on PATH;
#   3. per leg, a fresh venv under .venvs/ (git-ignored, deleted and made again on
#      every run): `uv venv --python <interpreter>` and `uv pip install -e ".[test]"`
#      with --refresh, so no cache can pin old versions; then pytest in it. The legs,
#      in the order they run:
#        310     Python 3.10, the lowest direct dependencies (--resolution
#                lowest-direct, i.e. pyproject.toml's floors): pytest -m "not browser"
#        313     Python 3.13, the newest dependencies: pytest -m "not browser"
#        readme  scripts/readme-commands.sh: the README's first command, verbatim, in a
#                fresh `python3.11 -m venv`, then every example notebook from the
#                console with its expected exit status
#        311     Python 3.11, the newest dependencies: the whole suite, browser tests
#                included (the main leg, run last so its pytest summary closes the log)
#   4. a summary: the interpreter and the versions of IPython, pandas, numpy and
#      pyarrow each leg used, its result and its time. The very last line sums all
#      legs: "N passed, N failed" (a leg that could not install counts as 1 failed).
#
# Choosing legs: FLOWMAGIC_TEST_LEGS="310 311" (any of 310 313 readme 311, spaces or
# commas; they always run in the order above). Default: all four, or only 311 when
# pytest args are given: `bash scripts/test.sh tests/test_dag.py -x` runs just that,
# on Python 3.11 with the newest dependencies. Pytest args go to every pytest leg that
# runs, after the leg's own (-n 2, -m "not browser"), so `-n 0` or `-m slow` override.
#
# Interpreters: FLOWMAGIC_PYTHON310=/path/to/python (same for 311, 313) if set, else
# python3.X on PATH, pyenv's versions ($(pyenv root), $PYENV_ROOT, ~/.pyenv), /usr/bin,
# /usr/local/bin, `uv python find` (local interpreters only: downloads are off). Python
# 3.11 is required; a missing 3.10 or 3.13 skips its leg, loudly, in the summary.
#
# Exit status: 0 when every leg that ran passed; 1 otherwise (pytest's exit 5, "collected
# no tests", is a failure too); 2 for a bad FLOWMAGIC_TEST_LEGS.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENVS=$REPO/.venvs
LOGS=$VENVS/logs
# uv must use this machine's interpreters, never download one.
export UV_PYTHON_DOWNLOADS=never
# The tests start hundreds of processes (console commands, kernels, task servers) that
# import the same modules: with PYTHONDONTWRITEBYTECODE set in the caller's environment
# every one of them compiles them again (~1-2 s of CPU each). Let the first write the cache.
unset PYTHONDONTWRITEBYTECODE

ALL_LEGS=(310 313 readme 311)
legs=${FLOWMAGIC_TEST_LEGS:-}
if [ -z "$legs" ]; then
  if [ $# -gt 0 ]; then legs=311; else legs="${ALL_LEGS[*]}"; fi
fi
legs=" ${legs//,/ } "
for leg in $legs; do
  case $leg in
    310|311|313|readme) ;;
    *) echo "test.sh: unknown leg '$leg' in FLOWMAGIC_TEST_LEGS (legs: ${ALL_LEGS[*]})" >&2; exit 2 ;;
  esac
done
wants() { [[ "$legs" == *" $1 "* ]]; }

banner() { printf '\n======== %s ========\n' "$*"; }
minsec() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# -- interpreters ---------------------------------------------------------------------
# The first candidate that runs and says it is Python $1, as its real executable (a
# pyenv shim resolves to the interpreter behind it).
find_python() {
  local want=$1 override="FLOWMAGIC_PYTHON${1/./}" root c exe
  local -a candidates=()
  [ -n "${!override:-}" ] && candidates+=("${!override}")
  c=$(command -v "python$want" 2>/dev/null) && candidates+=("$c")
  local -a roots=()
  command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root 2>/dev/null || true)")
  roots+=("${PYENV_ROOT:-}" "$HOME/.pyenv")
  for root in "${roots[@]}"; do
    [ -n "$root" ] && [ -d "$root/versions" ] || continue
    while IFS= read -r c; do candidates+=("$c"); done < <(
      printf '%s\n' "$root"/versions/"$want".*/bin/"python$want" | sort -rV)
  done
  candidates+=("/usr/local/bin/python$want" "/usr/bin/python$want")
  if [ -n "${UV:-}" ]; then
    c=$("$UV" python find --no-project "$want" 2>/dev/null) && candidates+=("$c")
  fi
  for c in "${candidates[@]}"; do
    [ -x "$c" ] || continue
    exe=$("$c" -c "import sys; print(sys.executable if '%d.%d' % sys.version_info[:2] == '$want' else '')" \
          2>/dev/null) || continue
    if [ -n "$exe" ]; then echo "$exe"; return 0; fi
  done
  return 1
}

py_version() { "$1" -c 'import platform; print(platform.python_version())'; }
# The versions a leg ran with, e.g. "IPython 9.18.1, pandas 2.3.3, numpy 2.3.4, pyarrow 22.0.0".
package_versions() {
  "$1" -c '
import importlib.metadata as m
names = [("IPython", "ipython"), ("pandas", "pandas"), ("numpy", "numpy"), ("pyarrow", "pyarrow")]
def version(dist):
    try:
        return m.version(dist)
    except m.PackageNotFoundError:
        return "missing"
print(", ".join(f"{shown} {version(dist)}" for shown, dist in names))' 2>/dev/null || echo "versions unknown"
}

PY311=$(find_python 3.11 || true)
if [ -z "$PY311" ] && { wants 311 || wants readme; }; then
  echo "test.sh: no Python 3.11 found (python3.11 on PATH, pyenv's versions, /usr/bin;" \
       "or set FLOWMAGIC_PYTHON311): the main leg cannot run" >&2
  exit 1
fi

# -- set-up ---------------------------------------------------------------------------
# System packages the tests drive: Debian's Chromium (browser tests) and Graphviz's `dot` (static SVG).
bash scripts/install-browser-deps.sh

mkdir -p "$LOGS"
banner "bootstrap: uv in a venv of its own"
bootstrap_python=${PY311:-$(command -v python3)}
rm -rf "$VENVS/uv"
"$bootstrap_python" -m venv "$VENVS/uv"
"$VENVS/uv/bin/python" -m pip install -q --disable-pip-version-check --upgrade uv
UV=$VENVS/uv/bin/uv
"$UV" --version
[ -n "$PY311" ] || PY311=$(find_python 3.11 || true)

# -- the legs -------------------------------------------------------------------------
SUMMARY=()             # one line per leg, printed at the end
TOTAL_PASSED=0
TOTAL_FAILED=0
OVERALL=0
# Legs whose failures are reported but do not fail the run (" 310 313 " etc.): none.
# Any name put here must say why in this comment and in README.md's Limits.
KNOWN_FAILING_LEGS=""

# Add a leg's "N passed, N failed, N errors" (pytest's summary line) to the totals.
count() {
  local line=$1 n
  n=$(grep -Eo '[0-9]+ passed' <<<"$line" | grep -Eo '[0-9]+' || echo 0)
  TOTAL_PASSED=$((TOTAL_PASSED + n))
  for word in failed errors error; do
    n=$(grep -Eo "[0-9]+ $word\\b" <<<"$line" | grep -Eo '[0-9]+' || echo 0)
    TOTAL_FAILED=$((TOTAL_FAILED + n))
  done
}

# run_leg NAME VERSION RESOLUTION [pytest args...]: a fresh venv, the install, pytest.
run_leg() {
  local name=$1 version=$2 resolution=$3
  shift 3
  local py dir=$VENVS/py$name log=$LOGS/$name.log started=$SECONDS installed status line versions
  if [ "$version" = 3.11 ]; then py=$PY311; else py=$(find_python "$version" || true); fi
  if [ -z "$py" ]; then
    banner "leg $name: SKIPPED, no Python $version on this machine"
    SUMMARY+=("leg $name  SKIPPED  *** no Python $version found (python$version on PATH, pyenv, /usr/bin, uv python find; or set FLOWMAGIC_PYTHON${version/./}) ***")
    return
  fi
  banner "leg $name: Python $(py_version "$py") ($py), $resolution dependencies"
  rm -rf "$dir"
  local -a install=(--refresh)      # revalidate every cached index page: the cache never pins old versions
  if [ "$resolution" = lowest ]; then install+=(--resolution lowest-direct); else install+=(--upgrade); fi
  if ! "$UV" venv -q --python "$py" "$dir" ||
     ! "$UV" pip install --python "$dir/bin/python" "${install[@]}" -e ".[test]"; then
    SUMMARY+=("leg $name  FAILED   Python $(py_version "$py"), $resolution deps: the install failed ($(minsec $((SECONDS - started))))")
    TOTAL_FAILED=$((TOTAL_FAILED + 1))
    OVERALL=1
    return
  fi
  installed=$SECONDS
  versions=$(package_versions "$dir/bin/python")
  echo "leg $name: $versions"
  set +e
  # As if activated: subprocesses (flowmagic, jupyter, uv) come from the venv too.
  env VIRTUAL_ENV="$dir" PATH="$dir/bin:$PATH" \
    "$dir/bin/python" -m pytest -q -p no:cacheprovider -n 2 --durations=15 "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  line=$(grep -E '^=* ?(no tests ran|[0-9]+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?))' "$log" \
         | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  [ -n "$line" ] || line="no pytest summary line (exit $status)"
  if [[ "$KNOWN_FAILING_LEGS" == *" $name "* && "$status" -ne 0 && "$status" -ne 5 ]]; then
    SUMMARY+=("leg $name  KNOWN FAILURES (not counted; see KNOWN_FAILING_LEGS)   Python $(py_version "$py") ($py), $resolution deps: $versions
             pytest $*: $line; install $(minsec $((installed - started))), tests $(minsec $((SECONDS - installed)))")
    return
  fi
  count "$line"
  local verdict=PASSED
  if [ "$status" -eq 5 ]; then
    echo "leg $name: pytest collected no tests: the suite is missing" >&2
    verdict=FAILED; line="$line (collected no tests)"; TOTAL_FAILED=$((TOTAL_FAILED + 1))
  elif [ "$status" -ne 0 ]; then
    verdict=FAILED
    grep -Eq '[0-9]+ (failed|errors?)' <<<"$line" || TOTAL_FAILED=$((TOTAL_FAILED + 1))  # crashed, interrupted
  fi
  [ "$verdict" = PASSED ] || OVERALL=1
  SUMMARY+=("leg $name  $verdict   Python $(py_version "$py") ($py), $resolution deps: $versions
             pytest $*: $line; install $(minsec $((installed - started))), tests $(minsec $((SECONDS - installed)))")
}

run_readme() {
  local log=$LOGS/readme.log started=$SECONDS status line
  banner "leg readme: the README's first command in a fresh venv, then every example from the console"
  set +e
  bash scripts/readme-commands.sh "$PY311" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  line=$(grep -E '^readme-commands: [0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1 | sed 's/^readme-commands: //')
  [ -n "$line" ] || line="no result line (exit $status)"
  count "$line"
  local verdict=PASSED
  if [ "$status" -ne 0 ]; then
    verdict=FAILED; OVERALL=1
    grep -Eq '[1-9][0-9]* failed' <<<"$line" || TOTAL_FAILED=$((TOTAL_FAILED + 1))
  fi
  SUMMARY+=("leg readme  $verdict   Python $(py_version "$PY311") ($PY311), pip's newest deps: $(package_versions "$VENVS/readme/bin/python")
             $line ($(minsec $((SECONDS - started))))")
}

wants 310 && run_leg 310 3.10 lowest -m "not browser" "$@"
wants 313 && run_leg 313 3.13 newest -m "not browser" "$@"
wants readme && run_readme
wants 311 && run_leg 311 3.11 newest "$@"

banner "summary ($(minsec "$SECONDS") in all)"
for line in "${SUMMARY[@]}"; do echo "$line"; done
for leg in "${ALL_LEGS[@]}"; do wants "$leg" || echo "leg $leg  not run (FLOWMAGIC_TEST_LEGS)"; done
echo "all legs together:"
echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
exit "$OVERALL"
