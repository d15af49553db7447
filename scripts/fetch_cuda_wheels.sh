#!/usr/bin/env bash
# Download the pure-Python wheels that scripts/cuda_checks.sh needs on the GPU machine,
# which has no network (see the device notes): jsonargparse (+ its [signatures] extras)
# for the Lightning CLI, Opacus (DP-SGD's accountant), and the peers benchmarked against:
# Liger-Kernel and cut-cross-entropy. Wheels land in .whl/ (ignored by .gitignore); carry it
# with the run. A wheel of another version left there by an earlier run (a different
# *_VERSION below) is an error here: two versions of one package stop the install there.
#
# usage: scripts/fetch_cuda_wheels.sh            (from the repository root)
#        PIP="python3 -m pip" scripts/fetch_cuda_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
DEST=.whl
mkdir -p "$DEST"

# versions match the dev venv; one version of each: a second copy of a package stops the install on the GPU machine
PKGS=(
  "jsonargparse[signatures]==${JSONARGPARSE_VERSION:-4.53.0}"
  "docstring-parser==${DOCSTRING_PARSER_VERSION:-0.18.0}"
  "typeshed-client==${TYPESHED_CLIENT_VERSION:-2.15.0}"
  "liger-kernel==0.8.5"
  "cut-cross-entropy==25.1.1"
  "opacus==1.6.0"          # DP-SGD's accountant (train_dp step); pure Python
  "opt-einsum==3.4.0"      # opacus' one requirement the GPU image may lack
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for spec in "${PKGS[@]}"; do
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${spec/\[signatures\]/}"
done

echo "wheels in $DEST:"
ls -1 "$DEST"
# one version of each distribution (names compared as pip does: case, '-', '_', '.')
dups=$(for w in "$DEST"/*.whl; do
  basename "$w" | cut -d- -f1 | tr 'A-Z.-' 'a-z__'
done | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "error: more than one wheel of: $(echo "$dups" | paste -sd ' ') in $DEST;" \
    "delete the stale ones (pip install on the GPU machine stops at two versions)" >&2
  exit 1
fi
echo
echo "their requirements (check each is on the GPU machine or in $DEST; skip 'extra' lines):"
for w in "$DEST"/*.whl; do
  echo "== $(basename "$w")"
  unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true
done
du -sh "$DEST"
