#!/usr/bin/env bash
# What `pip install torchbp` gives a user, checked end to end: build the sdist and the wheel
# from a clean clone of HEAD, check what each holds, install the wheel (not editable) with
# its train extra in a fresh virtual environment, and run the README's commands from an
# empty folder outside the repository. Exits non-zero on any failure: at the first failing
# command, or at the end when the sdist or the wheel lacks or holds what it should not (the
# commands still run, so one pass shows both).
#
# Usage: scripts/check_wheel.sh [WORK_DIR]
#   WORK_DIR  where the clone, the builds, the virtual environments and the runs go
#             (default: a new temporary folder; kept afterwards for inspection)
# Environment:
#   PYTHON      the interpreter the virtual environments are made from (default: python3)
#   TORCH_SPEC  the torch requirement installed first (default: torch==2.13.0)
# Takes 4 to 9 minutes on a 2-core CPU machine.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d -t torchbp-wheel-XXXXXX)}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CONSTRAINTS="$REPO/.ci/constraints.txt"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

step() { printf '\n== %s\n' "$*"; }

step "clean clone of HEAD and the build (sdist, then the wheel from it) in $WORK"
rm -rf "$WORK/clone" "$WORK/dist" "$WORK/build-venv"
git clone -q "$REPO" "$WORK/clone"
"$PYTHON" -m venv "$WORK/build-venv"
"$WORK/build-venv/bin/python" -m pip install -q build
"$WORK/build-venv/bin/python" -m build --outdir "$WORK/dist" "$WORK/clone" >"$WORK/build.log" 2>&1 ||
    { tail -20 "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/torchbp-*.whl)"
SDIST="$(ls "$WORK"/dist/torchbp-*.tar.gz)"

step "what the wheel and the sdist hold"
CONTENTS_OK=true
"$WORK/build-venv/bin/python" - "$WORK/clone" "$WHEEL" "$SDIST" <<'EOF' || CONTENTS_OK=false
"""Every tracked file under src/torchbp in the wheel and nothing else but its metadata;
the sdist holds the tracked sources, tests, docs, experiments and scripts; a declared
license ships its text; no byte code or big file in either."""
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections import Counter
from pathlib import Path

clone, wheel_path, sdist_path = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
tracked = subprocess.run(
    ["git", "-C", str(clone), "ls-files"], capture_output=True, text=True, check=True
).stdout.split()
project = tomllib.loads((clone / "pyproject.toml").read_text())["project"]
problems = []

wheel = zipfile.ZipFile(wheel_path)
members = {i.filename: i.file_size for i in wheel.infolist()}
package = {f.removeprefix("src/") for f in tracked if f.startswith("src/torchbp/")}
dist_info = f"torchbp-{project['version']}.dist-info/"
problems += [f"wheel lacks {f}" for f in sorted(package - set(members))]
problems += [
    f"wheel holds {f}, which is not a tracked file of the package"
    for f in sorted(set(members) - package)
    if not f.startswith(dist_info)
]
problems += [f"wheel holds {f} ({size} bytes)" for f, size in members.items() if size > 2**20]
if "license" in project and not any(f.startswith(dist_info + "licenses/") for f in members):
    problems.append(f"license {project['license']!r} declared, but no license file ships")

prefix = f"torchbp-{project['version']}/"
sdist = {m.removeprefix(prefix) for m in tarfile.open(sdist_path).getnames()}
wanted = ("src/", "tests/", "docs/", "experiments/", "scripts/", "README.md", "pyproject.toml")
lacking = Counter(
    f.split("/")[0]
    for f in tracked
    if (f.startswith(wanted) or f.startswith("LICENSE"))
    and f not in sdist
    and not (clone / f).is_symlink()
)
problems += [f"sdist lacks {n} tracked file(s) of {top}" for top, n in sorted(lacking.items())]
problems += [f"sdist holds byte code {f}" for f in sdist if f.endswith((".pyc", ".pyo"))]

print(f"wheel: {len(members)} files, sdist: {len(sdist)} entries")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF

step "fresh virtual environment: $TORCH_SPEC, then the wheel with its train extra"
rm -rf "$WORK/venv" "$WORK/run"
"$PYTHON" -m venv "$WORK/venv"
VENV_BIN="$WORK/venv/bin"
"$VENV_BIN/python" -m pip install -q -c "$CONSTRAINTS" "$TORCH_SPEC"
"$VENV_BIN/python" -m pip install -q -c "$CONSTRAINTS" "$WHEEL[train]"
"$VENV_BIN/python" -m pip check
export PATH="$VENV_BIN:$PATH"
mkdir -p "$WORK/run"
cd "$WORK/run"

step "import from site-packages; metadata version == torchbp.__version__; help(torchbp)"
python - <<'EOF'
import importlib.metadata
import sysconfig
from pathlib import Path

import torchbp

installed = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(torchbp.__file__).resolve().is_relative_to(installed), torchbp.__file__
assert importlib.metadata.version("torchbp") == torchbp.__version__
print("torchbp", torchbp.__version__, "from", Path(torchbp.__file__).parent)
EOF
PAGER=cat python -c "import torchbp; help(torchbp)" >/dev/null

step "torchbp-train --help"
torchbp-train --help >/dev/null

step "the README's training command: torchbp-train fit (digits, bundled data)"
torchbp-train fit >fit.log 2>&1 || { tail -30 fit.log; exit 1; }
grep '^test metrics' fit.log
torchbp-train validate --ckpt_path last >validate.log 2>&1 || { tail -30 validate.log; exit 1; }

step "every --config NAME the README and docs/ give is bundled, and each bundled config runs"
BUNDLED="$(python -c 'from torchbp.lightning.config_files import bundled_configs as b; print(*b())')"
# names only: a value with a "/" or a "." is a file path
MENTIONED="$(cat "$WORK/clone/README.md" "$WORK/clone"/docs/*.md |
    grep -oE -- '--config[ =][^ `)]+' | sed -E 's/^--config[ =]//' |
    grep -E '^[A-Za-z_][A-Za-z0-9_]*$' | sort -u)"
for name in $MENTIONED; do
    [[ " $BUNDLED " == *" $name "* ]] || { echo "docs name --config $name: not bundled"; exit 1; }
done
ONE_STEP=(--trainer.max_epochs 1 --trainer.limit_train_batches 2
    --trainer.limit_val_batches 2 --trainer.limit_test_batches 2)
for name in $BUNDLED; do
    torchbp-train fit --config "$name" "${ONE_STEP[@]}" >"config_$name.log" 2>&1 ||
        { tail -30 "config_$name.log"; echo "--config $name failed"; exit 1; }
    echo "--config $name: ok"
done
torchbp-train fit --config digits --print_config >my.yaml
torchbp-train fit --config my.yaml "${ONE_STEP[@]}" >my.log 2>&1 || { tail -30 my.log; exit 1; }
echo "--config my.yaml (from --print_config): ok"

step "torchbp-verify"
torchbp-verify >verify.log 2>&1 || { tail -30 verify.log; exit 1; }
tail -1 verify.log

step "the Python examples of README.md and docs/*.md"
mkdir -p examples
python - "$WORK/clone" <<'EOF'
import re
import sys
from pathlib import Path

clone = Path(sys.argv[1])
fence = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
for page in [clone / "README.md", *sorted((clone / "docs").glob("*.md"))]:
    text = page.read_text()
    for match in fence.finditer(text):
        if match.group(1) == "python":
            line = text.count("\n", 0, match.start()) + 1
            Path("examples", f"{page.stem}_{line}.py").write_text(match.group(2))
EOF
for example in examples/*.py; do
    python "$example" >"$example.log" 2>&1 || { tail -30 "$example.log"; echo "$example failed"; exit 1; }
    echo "$example: ok"
done

if [[ $CONTENTS_OK != true ]]; then
    step "the commands ran, but the sdist or the wheel has the PROBLEMs listed above ($WORK)"
    exit 1
fi
step "all checks passed ($WORK)"
