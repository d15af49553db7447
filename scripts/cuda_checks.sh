#!/usr/bin/env bash
# Every CUDA check in one go, for a machine with an NVIDIA GPU (issue 5 / issue 6):
#
#   1. pytest -m cuda                      (CUDA parity tests)
#   2. python -m torchbp.verify.cli --device cuda --json $OUT/verify_cuda.json
#   3. GPU training: torchbp.lightning.cli fit on configs/digits.yaml, precision 32 and
#      bf16-mixed, and DP-SGD (configs/digits_dp.yaml: per-sample clipping on the GPU)
#   4. the CUDA benchmarks (python -m experiments.bench --device cuda)
#
# and writes $OUT/cuda_report.md (device, torch version, date, pass counts, every
# benchmark figure) next to $OUT/bench_cuda.{md,json,png}, $OUT/verify_cuda.json and
# $OUT/cuda_checks.log. Every step runs under its own time limit and the script goes on
# past failures; the report lists each step's exit status. Aim: ~300 s in all.
#
# Usage, from the repository root:
#   OUT=/some/dir scripts/cuda_checks.sh        (OUT defaults to ./cuda_out)
# Pure-Python wheels the machine lacks (jsonargparse, Liger-Kernel, cut-cross-entropy;
# fetched by scripts/fetch_cuda_wheels.sh) are installed from .whl/ into /tmp/site.
# Step limits (seconds) can be overridden: T_PYTEST, T_VERIFY, T_TRAIN, T_BENCH.
# Then copy $OUT/bench_cuda.* to experiments/results/ and $OUT/cuda_report.md beside them.

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/cuda_out}
mkdir -p "$OUT"
PY=${PY:-python3}
T_PYTEST=${T_PYTEST:-60}
T_VERIFY=${T_VERIFY:-40}
T_TRAIN=${T_TRAIN:-50}
T_BENCH=${T_BENCH:-110}
LOG="$OUT/cuda_checks.log"
REPORT="$OUT/cuda_report.md"
STEPS=/tmp/cuda_checks_steps.tsv
: >"$LOG"
: >"$STEPS"
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8} # deterministic cuBLAS
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
export MPLBACKEND=Agg
T0=$(date +%s)

log() { echo "$@" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run with a time limit, keep going, remember rc / time / summary
step() {
  local name=$1 limit=$2
  shift 2
  local s e rc out=/tmp/cuda_step_$name.log
  log ""
  log "=== $name (limit ${limit}s): $*"
  s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1
  rc=$?
  e=$(date +%s)
  cat "$out" >>"$LOG"
  tail -n 25 "$out"
  [ $rc -eq 124 ] && log "!!! $name: timed out after ${limit}s"
  local summary
  summary=$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$out" | tail -n 1 | tr -d '=|' |
    sed 's/^ *//')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((e - s))" "${summary:-}" >>"$STEPS"
  log "=== $name: exit $rc in $((e - s))s"
  return 0
}

# 0. carried wheels -> /tmp/site (one version of each; --no-deps: the rest is installed)
SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
    SITE=/tmp/site
    log "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  else
    log "!!! wheel install failed (see log); going on without them"
  fi
else
  log "no .whl/ wheels: Liger-Kernel / CCE / jsonargparse only if already installed"
fi
export PYTHONPATH="$PWD/src:$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

# environment facts for the report
ENV_MD=$($PY - <<'EOF' 2>&1
import datetime, importlib, platform
import torch
print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
print(f"- host: {platform.node()} / {platform.platform()} / Python {platform.python_version()}")
print(f"- torch: {torch.__version__} (CUDA {torch.version.cuda})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("- device: NO CUDA DEVICE VISIBLE")
for mod in ("triton", "pytorch_lightning", "torchmetrics", "jsonargparse", "liger_kernel",
            "cut_cross_entropy", "torchbp"):
    try:
        m = importlib.import_module(mod)
        print(f"- {mod}: {getattr(m, '__version__', 'importable')} ({m.__file__})")
    except Exception as e:
        print(f"- {mod}: not importable ({type(e).__name__}: {str(e)[:120]})")
EOF
)
log "$ENV_MD"
GIT=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git)")
nvidia-smi -L >>"$LOG" 2>&1 || true

# 1. CUDA tests
step pytest_cuda "$T_PYTEST" $PY -m pytest -m cuda -q -p no:cacheprovider --no-header -rfE

# 2. verification suite on CUDA
step verify_cuda "$T_VERIFY" $PY -m torchbp.verify.cli --device cuda --json "$OUT/verify_cuda.json"

# 3. GPU training, fp32 and bf16-mixed
for prec in 32-true bf16-mixed; do
  step "train_${prec}" "$T_TRAIN" $PY -m torchbp.lightning.cli fit --config configs/digits.yaml \
    --trainer.accelerator cuda --trainer.devices 1 --trainer.precision "$prec" \
    --trainer.enable_progress_bar false --trainer.default_root_dir "/tmp/runs_$prec"
done

step train_dp "$T_TRAIN" $PY -m torchbp.lightning.cli fit --config configs/digits_dp.yaml \
  --trainer.accelerator cuda --trainer.devices 1 --trainer.enable_progress_bar false \
  --trainer.default_root_dir /tmp/runs_dp

# 4. benchmarks (results are rewritten after each case, so a time-out keeps what finished)
step bench_cuda "$T_BENCH" $PY -m experiments.bench --device cuda --out "$OUT" --budget 3

# ------------------------------------------------------------------------------ report
{
  echo "# torchbp CUDA checks"
  echo
  echo "Produced by \`scripts/cuda_checks.sh\` (git $GIT) in $(($(date +%s) - T0)) s."
  echo
  echo "$ENV_MD"
  echo
  echo "| step | exit | seconds | summary |"
  echo "| --- | --- | --- | --- |"
  while IFS=$'\t' read -r name rc secs summary; do
    st=$([ "$rc" = 0 ] && echo "$rc" || echo "**$rc**$([ "$rc" = 124 ] && echo ' (timeout)')")
    echo "| $name | $st | $secs | ${summary:-} |"
  done <"$STEPS"
  echo
  echo "## Verification (verify_cuda.json)"
  echo
  if [ -f "$OUT/verify_cuda.json" ]; then
    $PY - "$OUT/verify_cuda.json" <<'EOF' 2>&1
import collections, json, sys
d = json.load(open(sys.argv[1]))
def statuses(o, acc):
    if isinstance(o, dict):
        for k, v in o.items():
            if k in ("status", "result", "outcome") and isinstance(v, str):
                acc[v] += 1
            elif k in ("passed", "ok") and isinstance(v, bool):
                acc["passed" if v else "failed"] += 1
            else:
                statuses(v, acc)
    elif isinstance(o, list):
        for v in o:
            statuses(v, acc)
acc = collections.Counter()
statuses(d, acc)
print("status counts:", dict(acc) if acc else "(none found)")
if isinstance(d, dict):
    print("top-level keys:", ", ".join(map(str, d)))
    for k in ("summary", "totals", "counts"):
        if k in d:
            print(f"{k}: {json.dumps(d[k])[:1500]}")
EOF
  else
    echo "no verify_cuda.json was written"
  fi
  echo
  for prec in 32-true bf16-mixed; do
    echo "## Training, precision $prec (last lines)"
    echo
    echo '```'
    grep -v -E '^\s*$' "/tmp/cuda_step_train_${prec}.log" 2>/dev/null | tail -n 20
    echo '```'
    echo
  done
  echo "## Failures and errors (pytest)"
  echo
  echo '```'
  grep -E '^(FAILED|ERROR)' /tmp/cuda_step_pytest_cuda.log 2>/dev/null | head -n 40
  echo '```'
  echo
  echo "## Benchmarks (bench_cuda.md)"
  echo
  if [ -f "$OUT/bench_cuda.md" ]; then
    sed 's/^#/##/' "$OUT/bench_cuda.md"
  else
    echo "no benchmark results were written"
  fi
} >"$REPORT"
log ""
log "wrote $REPORT ($(($(date +%s) - T0)) s in all); files in $OUT:"
ls -1 "$OUT" | tee -a "$LOG"
exit 0
