#!/usr/bin/env bash
# Run the test suite on both ends of the torch range that the README promises
# (pyproject: torch>=2.11,<2.15), each in its own virtual environment, and write a summary
# to experiments/results/torch_range.md.
#
# Usage (from anywhere; takes a while, so be nice to the other users of the machine):
#   nice -n 10 scripts/test_torch_range.sh                 # torch 2.11.0 and 2.14.1
#   nice -n 10 scripts/test_torch_range.sh 2.14.1          # only some versions
#   PYTEST_ADDOPTS="-x tests/kernels" scripts/test_torch_range.sh   # extra pytest options
#
# Environment:
#   TORCHBP_RANGE_DIR      where the venvs live (default: ~/.cache/torchbp-range); must be
#                          outside the repository. A venv found there is reused: the install
#                          steps below are re-run every time but are no-ops when satisfied.
#   TORCHBP_RANGE_REBUILD  1: delete each venv and build it afresh.
#   TORCHBP_RANGE_TRITON   a Triton version to install over the one torch brings (pip then
#                          warns that torch pins another). Default: the Triton that torch's
#                          wheel requires (PyPI's torch 2.11.0: 3.6.0, 2.14.1: 3.8.x), or,
#                          for a torch that brings none, CI's pin from .ci/constraints.txt.
#   TORCHBP_RANGE_OUT      the summary file (default: experiments/results/torch_range.md).
#
# The torch wheels on PyPI are CUDA builds (~5 GB per venv with their NVIDIA libraries);
# on a machine without a GPU their CUDA tests skip as they do with the CPU build.
# Exit status: 0 when every version's run passed, 1 otherwise (the summary is written
# either way).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
RANGE_DIR="${TORCHBP_RANGE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torchbp-range}"
OUT="${TORCHBP_RANGE_OUT:-$ROOT/experiments/results/torch_range.md}"
VERSIONS=("$@")
[[ ${#VERSIONS[@]} -gt 0 ]] || VERSIONS=(2.11.0 2.14.1)

mkdir -p "$RANGE_DIR"
RANGE_DIR="$(cd "$RANGE_DIR" && pwd -P)"
# Never inside the repository: pytest would collect from it, ruff would lint it, git sees it.
case "$RANGE_DIR/" in
"$ROOT"/*)
    echo "TORCHBP_RANGE_DIR=$RANGE_DIR is inside the repository $ROOT; pick another" >&2
    exit 2
    ;;
esac

# CI's Triton pin, for a torch whose wheel brings no Triton (a CPU build).
CI_TRITON="$(sed -n 's/^triton==\([^ ]*\).*/\1/p' "$ROOT/.ci/constraints.txt")"

log() { echo "[torch-range $(date +%H:%M:%S)] $*" >&2; }

# pip, quietly; its full output goes to the venv's install.log, shown if it fails.
pip_q() {
    local venv=$1
    shift
    if ! "$venv/bin/python" -m pip install "$@" >>"$venv/install.log" 2>&1; then
        grep -v '^WARNING: Location' "$venv/install.log" | tail -n 30 >&2
        return 1
    fi
}

# Build (or bring up to date) the venv of torch $1 at $2. Called in an `if`, where `set -e`
# is off, so every step that can fail returns explicitly.
setup_venv() {
    local version=$1 venv=$2
    if [[ "${TORCHBP_RANGE_REBUILD:-0}" == 1 && -d "$venv" ]]; then
        log "torch $version: deleting $venv (TORCHBP_RANGE_REBUILD=1)"
        rm -rf "$venv" || return 1
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        log "torch $version: creating $venv"
        python3 -m venv "$venv" || return 1
    fi
    : >"$venv/install.log"
    log "torch $version: installing torch (a no-op when present; minutes when not)"
    pip_q "$venv" -q "torch==$version" || return 1
    # The package with the extras CI uses; the constraint keeps pip off other torch builds.
    log "torch $version: installing torchbp -e .[train,dev]"
    echo "torch==$version" >"$venv/constraints.txt"
    pip_q "$venv" -q -c "$venv/constraints.txt" -e "${ROOT}[train,dev]" || return 1
    local triton="${TORCHBP_RANGE_TRITON:-}"
    if [[ -z "$triton" ]] && ! "$venv/bin/python" -c "import triton" 2>/dev/null; then
        triton="$CI_TRITON"
    fi
    if [[ -n "$triton" ]]; then
        log "torch $version: installing triton==$triton"
        pip_q "$venv" -q --no-deps "triton==$triton" || return 1
    fi
}

# One line of facts about the venv's stack, for the summary.
describe_venv() {
    "$1/bin/python" - <<'EOF'
import platform

import numpy
import torch

try:
    import triton

    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(
    f"torch {torch.__version__}, triton {triton_version}, numpy {numpy.__version__}, "
    f"Python {platform.python_version()}, CUDA available: {torch.cuda.is_available()}"
)
EOF
}

# Counts and skip reasons from pytest's JUnit XML ($2), as Markdown; $1 is the venv.
summarize_junit() {
    "$1/bin/python" - "$2" <<'EOF'
import collections
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(
    f"- counts: {passed} passed, {n['failures']} failed, {n['errors']} errors, "
    f"{n['skipped']} skipped ({n['tests']} in all)"
)
reasons = collections.Counter(
    (s.get("message") or "").strip() for case in root.iter("testcase") for s in case.iter("skipped")
)
if reasons:
    print("- skip reasons:")
    for reason, count in reasons.most_common():
        print(f"  - {count} × {reason.replace('|', '/')[:160]}")
EOF
}

# Run the suite in the venv of torch $1 and write its section of the summary into
# $SECTIONS; returns pytest's exit status. Called as `run_version ... || status=1`, where
# `set -e` is off: failures are handled explicitly.
run_version() {
    local version=$1
    local venv="$RANGE_DIR/torch-$version"
    local section="$SECTIONS/$version.md"
    if ! setup_venv "$version" "$venv"; then
        {
            echo "## torch $version"
            echo
            echo "- **setup failed**: see $venv/install.log"
            echo
        } >"$section"
        return 1
    fi
    local stack
    stack="$(describe_venv "$venv")"
    log "$stack"
    log "torch $version: python -m pytest -q -p no:cacheprovider ${PYTEST_ADDOPTS:-} (log: $venv/pytest.log)"
    rm -f "$venv/junit.xml"
    local start end rc=0
    start=$(date +%s)
    # TRITON_INTERPRET would put the whole session in interpreter mode; the interpreter
    # tests start their own interpreting subprocess.
    (cd "$ROOT" && env -u TRITON_INTERPRET "$venv/bin/python" -m pytest -q \
        -p no:cacheprovider --junitxml="$venv/junit.xml") >"$venv/pytest.log" 2>&1 || rc=$?
    end=$(date +%s)
    local closing
    closing="$(grep -E '^=*.* in [0-9.]+s' "$venv/pytest.log" | tail -n 1 | tr -d '=' |
        sed 's/^ *//; s/ *$//')"
    log "torch $version: exit $rc: $closing"
    {
        echo "## torch $version"
        echo
        echo "- stack: $stack"
        echo "- venv: \`$venv\`"
        echo "- pytest exit status: $rc; closing line: \`${closing:-none}\`"
        echo "- duration: $((end - start)) s"
        if [[ -s "$venv/junit.xml" ]]; then
            summarize_junit "$venv" "$venv/junit.xml"
        fi
        # pytest's short summary (-rfEX in pyproject): FAILED / ERROR / XPASS lines
        local failing
        failing="$(sed -n -E 's/^(FAILED|ERROR|XPASS) ([^ ]+)( - .*)?$/\1 \2/p' "$venv/pytest.log")"
        if [[ -n "$failing" ]]; then
            echo "- failing:"
            echo
            echo '```'
            echo "$failing"
            echo '```'
        else
            echo "- failing: none"
        fi
        echo
    } >"$section"
    return "$rc"
}

SECTIONS="$(mktemp -d)"
trap 'rm -rf "$SECTIONS"' EXIT
status=0
started="$(date -u '+%Y-%m-%d %H:%M UTC')"
for version in "${VERSIONS[@]}"; do
    run_version "$version" || status=1
done

if commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"; then
    tree="commit $commit + $(git -C "$ROOT" status --porcelain | wc -l) uncommitted paths"
else
    tree="not a git checkout"
fi
mkdir -p "$(dirname "$OUT")"
{
    echo "# Test suite across the supported torch range"
    echo
    echo "Written by \`scripts/test_torch_range.sh\` (rerun: \`nice -n 10 scripts/test_torch_range.sh\`)."
    echo "Each torch in its own venv under \`$RANGE_DIR\`, the package installed \`-e .[train,dev]\`,"
    echo "then \`python -m pytest -q -p no:cacheprovider\` in the repository root."
    echo "The \"interpreter tests\" skips are by design: each \`test_interpreter_suite\` in"
    echo "\`tests/kernels/\` runs them in a \`TRITON_INTERPRET=1\` subprocess and passes only if all"
    echo "of them ran and passed there. CUDA tests skip on a machine without a GPU."
    echo
    echo "- date: $started"
    echo "- tree: $ROOT at $tree (the tree as it was when the tests ran)"
    echo "- host: $(nproc) CPUs, $(uname -sm)"
    echo
    for version in "${VERSIONS[@]}"; do
        if [[ -f "$SECTIONS/$version.md" ]]; then
            cat "$SECTIONS/$version.md"
        else
            printf '## torch %s\n\n- no result (the run stopped early)\n\n' "$version"
        fi
    done
} >"$OUT"
log "summary: $OUT"
exit "$status"
