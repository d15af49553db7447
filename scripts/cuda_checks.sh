#!/usr/bin/env bash
# Every CUDA check in one go, for a machine with an NVIDIA GPU (issues 5, 6 and 10).
# Steps, most important first (each under its own time limit, all under one deadline):
#
#   wheels          carried pure-Python wheels (.whl/) -> /tmp/site
#   pytest_changed  pytest -m cuda on the CUDA branches changed last: clip mode's
#                   outside-parameter watch with its hooks on autograd's device thread
#                   (refusals and served steps), cross-entropy's weighted_rows on CUDA and
#                   its paths free of host syncs, GELU's backward fixes at special inputs
#                   (session 19); per-sample gradients
#                   (noise drawn on the device, backward on autograd's device thread; a
#                   step free of host syncs, p.grad_dtype, clip mode's graph walk, a model
#                   split between CPU and GPU), torchbp.verify (seeding only the inputs'
#                   CUDA generator)
#   verify_cuda     python -m torchbp.verify.cli --device cuda --json $OUT/verify_cuda.json
#   train_dp        DP-SGD fit on the GPU (configs/digits_dp.yaml: per-sample clipping, noise)
#   train_32-true, train_bf16-mixed   fit configs/digits.yaml on the GPU
#   pytest_cuda     pytest -m cuda on everything else but the Triton kernels
#   pytest_triton   pytest -m cuda on the Triton kernels (compiles them: slowest per test)
#   bench_cuda      python -m experiments.bench --device cuda (results rewritten after each
#                   case, so a time-out keeps what finished)
#
# and writes $OUT/cuda_report.md (device, versions, date, one row per step with its exit
# status, seconds and summary, failures, training tails, every benchmark figure) next to
# $OUT/cuda_checks.log (every step's whole output), $OUT/verify_cuda.json and
# $OUT/bench_cuda.{md,json,png}: six files. The script goes on past failures and always
# writes the report; its own exit status is 0.
#
# Time: T_TOTAL (default 270 s) bounds the whole run, report included, even when the GPU
# hangs: every command that may touch it (the environment facts, nvidia-smi, each step)
# runs under a limit, is killed at it (SIGTERM, SIGKILL 5 s later) and is left behind
# where even SIGKILL does not end it (a process stuck in the driver; reported as "hung").
# A step gets its own limit or what is left, whichever is less, and a step with no time
# left is reported as skipped. Per-step limits: T_PYTEST_CHANGED, T_VERIFY, T_TRAIN,
# T_PYTEST, T_TRITON, T_BENCH; T_ENV for each preparation (wheels, environment facts,
# nvidia-smi); REPORT_RESERVE (10 s) kept for the report. Estimated, never measured on a GPU
# (s): wheels+env 10, pytest_changed 25-35 (164 CUDA tests, one process; 85 of them small
# session-19 cases), verify 30-50 (357 case runs, 28 compiles with aot_eager; its JSON is
# written only at its end), train_dp 20, each other fit 15, pytest_cuda 35-60 with
# pytest-xdist (PYTEST_WORKERS, 8: half the 16 cores; 2191 CUDA tests), pytest_triton
# 30-60 (299 tests, cold Triton cache), bench what is left.
#
# Usage, from anywhere:
#   OUT=/some/dir bash scripts/cuda_checks.sh        (OUT defaults to ./cuda_out)
#   DRY_RUN=1 bash scripts/cuda_checks.sh            (any machine: each step checks its
#       arguments instead of running -- pytest --collect-only, verify/bench --list, fit
#       --print_config -- and the report is written as on the GPU)
# Pure-Python wheels the machine lacks (jsonargparse, Opacus, Liger-Kernel,
# cut-cross-entropy; fetched by scripts/fetch_cuda_wheels.sh) are installed from .whl/.
# Then copy $OUT/bench_cuda.* to experiments/results/ and $OUT/cuda_report.md beside them.

set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/cuda_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
read -r -a PY <<<"${PY:-python3}" # PY="python3 -X dev" works too
DRY_RUN=${DRY_RUN:-0}
T_TOTAL=${T_TOTAL:-270}
T_PYTEST_CHANGED=${T_PYTEST_CHANGED:-45}
T_VERIFY=${T_VERIFY:-60}
T_TRAIN=${T_TRAIN:-45}
T_PYTEST=${T_PYTEST:-80}
T_TRITON=${T_TRITON:-60}
T_BENCH=${T_BENCH:-110}
T_ENV=${T_ENV:-60}
REPORT_RESERVE=${REPORT_RESERVE:-10} # seconds kept for the report at the end
KILL_GRACE=5                         # SIGTERM at a limit, SIGKILL this much later
LOG="$OUT/cuda_checks.log"
REPORT="$OUT/cuda_report.md"
WORK=$(mktemp -d /tmp/cuda_checks.XXXXXX) # step logs and the step table (not in $OUT:
STEPS="$WORK/steps.tsv"                   # only a few files come back from there)
: >"$LOG"
: >"$STEPS"
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8} # deterministic cuBLAS
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
export MPLBACKEND=Agg
T0=$(date +%s)

log() { echo "$@" | tee -a "$LOG"; }
dry() { [ "$DRY_RUN" = 1 ]; }
record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"; } # name, exit, seconds, summary

# summary_of LOGFILE: pytest's last count line, else the counts of -v result words (a
# pytest killed at its limit prints no summary), else the last line naming pass/fail
summary_of() {
  local line
  line=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected|tests? collected)' "$1" |
    tail -n 1 | tr -d '=|' | sed 's/^ *//')
  if [ -z "$line" ]; then
    line=$(grep -oE '\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b' "$1" | sort | uniq -c |
      awk '{printf "%s%s %s", (NR > 1 ? ", " : "so far: "), $1, tolower($2)}')
  fi
  if [ -z "$line" ]; then # torchbp.verify's last line; a fit's test metrics
    line=$(grep -iE 'passed|failed|test/(acc|loss)|train/epsilon' "$1" | tail -n 3 |
      tr -d '|│┃' | tr -s ' ' | paste -sd ';' | cut -c1-200)
  fi
  echo "$line"
}

# time_left LIMIT_S: LIMIT_S, or less: what a command may run so that, killed at its limit
# and waited for up to KILL_GRACE + 1 s more, it ends before the report's reserve
time_left() {
  local left=$((T_TOTAL - REPORT_RESERVE - KILL_GRACE - 1 - ($(date +%s) - T0)))
  echo $((left < $1 ? left : $1))
}

# bounded LIMIT_S OUTFILE CMD...: CMD's exit status (124 / 137: killed at LIMIT_S), its
# output in OUTFILE; stdin is /dev/null. Waits at most LIMIT_S + KILL_GRACE + 1 s: a
# process that SIGKILL does not end (stuck in the GPU driver) is left behind and the
# status is "hung". With LIMIT_S under 1 s CMD does not run and the status is "skipped"
# (timeout 0 would mean no limit at all, and a negative limit is an error).
bounded() {
  local limit=$1 out=$2 pid deadline
  shift 2
  if [ "$limit" -lt 1 ]; then
    echo "not run: no time left under T_TOTAL=${T_TOTAL}s" >"$out"
    echo skipped
    return 0
  fi
  # in milliseconds: whole seconds would cut the 1 s after SIGKILL to what is left of
  # the second it started in
  deadline=$(($(date +%s%3N) + (limit + KILL_GRACE + 1) * 1000))
  timeout --kill-after="$KILL_GRACE" "$limit" "$@" >"$out" 2>&1 </dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(date +%s%3N)" -ge "$deadline" ]; then
      echo hung
      return 0
    fi
    sleep 0.2
  done
  wait "$pid"
  echo $?
}

# step NAME LIMIT_S DRY_ARGS CMD...: run CMD with min(LIMIT_S, time left) seconds; in a dry
# run, run CMD DRY_ARGS instead (DRY_ARGS is one word list, "" for none). Never fails.
step() {
  local name=$1 limit=$2 dry_args=$3
  shift 3
  local out="$WORK/$name.log" s e rc
  limit=$(time_left "$limit")
  log ""
  if [ "$limit" -lt 5 ]; then
    log "=== $name: skipped, no time left under T_TOTAL=${T_TOTAL}s"
    record "$name" "skipped" 0 "no time left (T_TOTAL=${T_TOTAL}s)"
    return 0
  fi
  # shellcheck disable=SC2086 # dry_args is a word list on purpose
  dry && set -- "$@" $dry_args
  log "=== $name (limit ${limit}s): $*"
  s=$(date +%s)
  rc=$(bounded "$limit" "$out" "$@")
  e=$(date +%s)
  cat "$out" >>"$LOG"
  tail -n 25 "$out"
  case $rc in
    124 | 137) log "!!! $name: timed out after ${limit}s (exit $rc)" ;;
    hung) log "!!! $name: still running ${KILL_GRACE}s after SIGKILL: left behind (hung)" ;;
  esac
  record "$name" "$rc" "$((e - s))" "$(summary_of "$out")"
  log "=== $name: exit $rc in $((e - s))s"
  return 0
}

# ---------------------------------------------------------------- 0. carried wheels
# -> /tmp/site (one version of each; --no-deps: the rest is installed)
SITE=""
s=$(date +%s)
if compgen -G ".whl/*.whl" >/dev/null; then
  rc=$(bounded "$(time_left "$T_ENV")" "$WORK/wheels.log" "${PY[@]}" -m pip install -q \
    --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl)
  cat "$WORK/wheels.log" >>"$LOG"
  if [ "$rc" = 0 ]; then
    SITE=/tmp/site
    msg="installed $(compgen -G '.whl/*.whl' | wc -l) wheels from .whl/ into /tmp/site"
    record wheels 0 "$(($(date +%s) - s))" "$msg"
  elif [ "$rc" = skipped ]; then
    msg="!!! wheels not installed: no time left under T_TOTAL=${T_TOTAL}s"
    record wheels skipped 0 "no time left (T_TOTAL=${T_TOTAL}s)"
  else
    msg="!!! wheel install failed (exit $rc, see log); going on without them"
    record wheels "$rc" "$(($(date +%s) - s))" "install failed: see cuda_checks.log"
  fi
else
  msg="no .whl/ wheels: jsonargparse / Opacus / Liger-Kernel / CCE only if already installed"
  record wheels "-" 0 "no .whl/ folder (run scripts/fetch_cuda_wheels.sh and carry .whl)"
fi
log "$msg"
export PYTHONPATH="$PWD/src:$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- environment facts
# (the modules the steps import: the benchmark's peers as it imports them)
cat >"$WORK/env.py" <<'EOF'
import datetime, importlib, os, platform, shutil
import torch
print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
print(f"- host: {platform.node()} / {platform.platform()} / Python {platform.python_version()}")
print(f"- torch: {torch.__version__} (CUDA {torch.version.cuda})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("- device: NO CUDA DEVICE VISIBLE")
# Triton (its kernels, inductor's) builds a C launcher on first use, with $CC, gcc or clang (as
# triton/runtime/build.py looks): without one no Triton kernel runs
cc = os.environ.get("CC") or next(filter(None, map(shutil.which, ("gcc", "clang"))), None)
print(f"- C compiler (Triton's launcher): {cc or 'NONE FOUND: every Triton kernel will fail'}")
for mod in ("triton", "pytorch_lightning", "torchmetrics", "jsonargparse", "opacus",
            "sklearn", "xdist", "pytest_timeout", "liger_kernel",
            "liger_kernel.transformers.cross_entropy",
            "liger_kernel.transformers.fused_linear_cross_entropy", "cut_cross_entropy",
            "torchbp"):
    try:
        m = importlib.import_module(mod)
        print(f"- {mod}: {getattr(m, '__version__', 'importable')} ({m.__file__})")
    except Exception as e:
        print(f"- {mod}: not importable ({type(e).__name__}: {str(e)[:120]})")
EOF
rc=$(bounded "$(time_left "$T_ENV")" "$WORK/env.md" "${PY[@]}" "$WORK/env.py")
ENV_MD=$(cat "$WORK/env.md")
case $rc in
  0) ;;
  skipped) ENV_MD="- !!! environment facts: skipped, no time left under T_TOTAL=${T_TOTAL}s" ;;
  *) ENV_MD="$ENV_MD
- !!! environment facts: exit $rc (124 / 137 / hung: python did not finish in time)" ;;
esac
log "$ENV_MD"
dry && log "- DRY RUN: every step checks its arguments only; nothing ran on a GPU"
GIT=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git)")
bounded "$(time_left 15)" "$WORK/nvidia-smi.log" nvidia-smi -L >/dev/null
cat "$WORK/nvidia-smi.log" >>"$LOG"

# pytest: -v (a time-out still leaves each finished test's result in the log), pytest-xdist
# workers and a per-test limit where the plugins are installed (not in a dry run); the
# tests in the order given (-p no:randomly: pytest-randomly, where installed, would shuffle
# the class-index check, whose device-side assert is sticky, before other CUDA tests)
PYTEST=("${PY[@]}" -m pytest -m cuda -v -p no:cacheprovider -p no:randomly --no-header -rfEX
  --continue-on-collection-errors) # one broken module must not cancel the whole step
PAR=()
if ! dry; then # (as the environment facts found them)
  grep -q '^- xdist: [^n]' <<<"$ENV_MD" && PAR+=(-n "${PYTEST_WORKERS:-8}")
  grep -q '^- pytest_timeout: [^n]' <<<"$ENV_MD" && PAR+=(--timeout 60)
fi
# test_cuda_readiness.py last: its class-index check, should it end in a device-side
# assert (sticky: every later CUDA call in the process fails), spoils nothing after it
CHANGED=(tests/test_cuda_s19_watch.py tests/test_cuda_s19_ce_paths.py tests/test_cuda_s19_gelu.py
  tests/test_per_sample.py tests/test_per_sample_devices.py tests/verify tests/test_cuda_readiness.py)
TRITON=(tests/kernels/test_triton_act.py tests/kernels/test_triton_ce.py)
IGNORE=()
for path in "${CHANGED[@]}" "${TRITON[@]}"; do IGNORE+=(--ignore "$path"); done
TRAIN=(--trainer.accelerator cuda --trainer.devices 1 --trainer.enable_progress_bar false)

# ---------------------------------------------------------------- the steps
step pytest_changed "$T_PYTEST_CHANGED" "--collect-only -q -q" "${PYTEST[@]}" "${CHANGED[@]}"

step verify_cuda "$T_VERIFY" "--list" "${PY[@]}" -m torchbp.verify.cli --device cuda --no-progress \
  --json "$OUT/verify_cuda.json"

step train_dp "$T_TRAIN" "--print_config" "${PY[@]}" -m torchbp.lightning.cli fit \
  --config configs/digits_dp.yaml "${TRAIN[@]}" --trainer.default_root_dir "$WORK/runs_dp"

for prec in 32-true bf16-mixed; do
  step "train_${prec}" "$T_TRAIN" "--print_config" "${PY[@]}" -m torchbp.lightning.cli fit \
    --config configs/digits.yaml "${TRAIN[@]}" --trainer.precision "$prec" \
    --trainer.default_root_dir "$WORK/runs_$prec"
done

step pytest_cuda "$T_PYTEST" "--collect-only -q -q" "${PYTEST[@]}" ${PAR[@]+"${PAR[@]}"} \
  tests "${IGNORE[@]}"

step pytest_triton "$T_TRITON" "--collect-only -q -q" "${PYTEST[@]}" ${PAR[@]+"${PAR[@]}"} \
  "${TRITON[@]}"

step bench_cuda "$T_BENCH" "--list --device cpu" "${PY[@]}" -m experiments.bench --device cuda --out "$OUT" \
  --budget 3

# ------------------------------------------------------------------------------ report
cat >"$WORK/verify_summary.py" <<'EOF'
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
# the top-level ok is the run's verdict, not a case's: counted, an unfinished run's false
# would read as one failed case (its summary says INCOMPLETE)
statuses({k: v for k, v in d.items() if k != "ok"} if isinstance(d, dict) else d, acc)
print("status counts:", dict(acc) if acc else "(none found)")
if isinstance(d, dict):
    print("top-level keys:", ", ".join(map(str, d)))
    for k in ("complete", "planned_case_runs", "summary", "totals", "counts"):
        if k in d:
            print(f"{k}: {json.dumps(d[k])[:1500]}")
EOF
{
  echo "# torchbp CUDA checks"
  echo
  echo "Produced by \`scripts/cuda_checks.sh\` (git $GIT) in $(($(date +%s) - T0)) s" \
    "(T_TOTAL=${T_TOTAL}s)$(dry && echo ': DRY RUN, nothing ran on a GPU')."
  echo
  echo "$ENV_MD"
  echo
  echo "| step | exit | seconds | summary |"
  echo "| --- | --- | --- | --- |"
  while IFS=$'\t' read -r name rc secs summary; do
    case $rc in
      0 | -) st=$rc ;;
      124 | 137) st="**$rc** (timeout)" ;;
      *) st="**$rc**" ;;
    esac
    echo "| $name | $st | $secs | ${summary:-} |"
  done <"$STEPS"
  echo
  echo "## Verification (verify_cuda.json)"
  echo
  if [ -f "$OUT/verify_cuda.json" ]; then
    rc=$(bounded 3 "$WORK/verify_summary.txt" "${PY[@]}" "$WORK/verify_summary.py" \
      "$OUT/verify_cuda.json")
    cat "$WORK/verify_summary.txt"
    [ "$rc" = 0 ] || echo "(summary: exit $rc)"
  else
    echo "no verify_cuda.json was written"
  fi
  echo
  for name in train_dp train_32-true train_bf16-mixed; do
    echo "## Training: $name (last lines)"
    echo
    echo '```'
    grep -v -E '^\s*$' "$WORK/$name.log" 2>/dev/null | tail -n 20
    echo '```'
    echo
    # the checkpoints the fit wrote (a best one and last.ckpt, saved every epoch) in the
    # run folder it names (under the config's logger folder, not default_root_dir)
    run=$(sed -n 's/^run folder: //p' "$WORK/$name.log" 2>/dev/null | tail -n 1)
    ckpts=$([ -n "$run" ] && find "$run" -name '*.ckpt' -printf '%P (%s bytes)\n' | sort)
    echo "run folder: ${run:-none named}"
    echo "checkpoints: ${ckpts:-none}" | paste -sd ';'
    if ! dry && ! grep -q '/last\.ckpt ' <<<"$ckpts"; then
      echo "!!! no last.ckpt was written"
    fi
    echo
  done
  echo "## Failures and errors (pytest)"
  echo
  echo '```'
  for name in pytest_changed pytest_cuda pytest_triton; do
    grep -h -E '^(FAILED|ERROR|XPASS)|(FAILED|ERROR|XPASS) tests/| (FAILED|ERROR|XPASS)( |$)' \
      "$WORK/$name.log" 2>/dev/null | sed "s/^/$name: /" | sort -u | head -n 40
  done
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
find "$OUT" -maxdepth 1 -type f -printf '%f\n' | sort | tee -a "$LOG"
exit 0
