#!/usr/bin/env bash
# The whole GPU pass in one call (shared/GPU.md): versions, build for sm_90, pytest -m cuda,
# compute-sanitizer memcheck on a small run of every GPU kernel, and the benchmark suite's GPU
# configuration (with mamba_ssm when it is carried), everything into $OUT.
#
#   bash bench/gpu_check.sh                              every stage, in one call
#   bash bench/gpu_check.sh build mamba test sanitize    a first call, then while still warm:
#   bash bench/gpu_check.sh bench                        the benchmarks in a second call
#   GPU_CHECK_DRY_RUN=1 PYTHON=/path/to/python bash bench/gpu_check.sh
#       on a machine without a GPU: runs every part that needs none, prints the rest
#
# Stages run in this order whatever the order given: versions (always), mamba (a background
# build), build, test, sanitize, bench. A failed stage is reported and the later ones still run,
# except after a failed versions or build stage (nothing could run). The last lines summarise
# every stage; the exit status is 1 when one failed.
#
# Environment: OUT (required unless dry run), PYTHON (default python3), MAX_JOBS (default 16),
# MAMBA_WAIT_S (how long the bench stage waits for the mamba_ssm build, default 240).
# mamba_ssm travels in bench/vendor/ (ignored by git; name it in the device tool's carry): a
# wheel mamba_ssm-*.whl is installed as is; else the source archive mamba_ssm-*.tar.gz is built
# for sm_90 only, in the background, and its wheel is left in $OUT/mamba/wheel to carry next
# time. Its build needs the wheel and packaging packages: carried wheels of them in bench/vendor/
# are installed when the machine lacks them. See bench/vendor/README.md.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
DRY=${GPU_CHECK_DRY_RUN:-0}
PY=${PYTHON:-python3}
VENDOR=$ROOT/bench/vendor
MAMBA_WAIT_S=${MAMBA_WAIT_S:-240}
export PATH="$PATH:${CUDA_HOME:-/usr/local/cuda}/bin"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
# The GPU machine reaches no registry, and its Python is the system's.
export PIP_NO_INDEX=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1

STAGES=(versions mamba build test sanitize bench)
for s in "$@"; do
  case " ${STAGES[*]} " in
    *" $s "*) ;;
    *) echo "gpu_check: unknown stage '$s' (stages: ${STAGES[*]})" >&2; exit 2 ;;
  esac
done
WANTED=" versions ${*:-${STAGES[*]}} "
WANT=" "
for s in "${STAGES[@]}"; do [[ "$WANTED" == *" $s "* ]] && WANT+="$s "; done
wants() { [[ "$WANT" == *" $1 "* ]]; }

if [ "$DRY" = 1 ]; then
  OUT=${OUT:-$ROOT/out/gpu-check-dry}
elif [ -z "${OUT:-}" ]; then
  echo "gpu_check: OUT is not set (the device tool sets it; GPU_CHECK_DRY_RUN=1 for a dry run)" >&2
  exit 2
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
TEE_PID=$!

SUMMARY=()
FAILED=0
MAMBA_PID=""
MAMBA_STATUS=$OUT/mamba/status

say() { echo "gpu_check: $*"; }
would() { echo "DRY RUN, would run: $*"; }

# The tool must be on PATH; in a dry run its absence is reported and the caller skips its use.
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$DRY" = 1 ]; then
    say "$1 is not on PATH here (it must be on the GPU machine)"
    return 2
  fi
  say "FAILED: $1 is not on PATH"
  return 1
}

run_stage() {
  local name=$1 t0=$SECONDS rc
  shift
  echo
  echo "=== $name ($(date -u +%H:%M:%S), ${SECONDS}s into the call)"
  "$@"
  rc=$?
  if [ $rc -eq 0 ]; then
    SUMMARY+=("$(printf '%-9s PASS %5ss' "$name" $((SECONDS - t0)))")
  else
    say "FAILED: stage $name (exit $rc)"
    SUMMARY+=("$(printf '%-9s FAIL %5ss  exit %s' "$name" $((SECONDS - t0)) "$rc")")
    FAILED=1
  fi
  return $rc
}

finish() {
  local rc
  if [ -n "$MAMBA_PID" ] && [ ! -s "$MAMBA_STATUS" ]; then
    say "the mamba_ssm build is still running at the end of the call: stopping it"
    kill -- -"$MAMBA_PID" 2>/dev/null
    SUMMARY+=("$(printf '%-9s FAIL %5ss  build not finished' mamba-bg 0)")
    FAILED=1
  fi
  echo
  echo "=== summary ($([ "$DRY" = 1 ] && echo "DRY RUN, ")${SECONDS}s)"
  printf '%s\n' "${SUMMARY[@]}"
  echo "artefacts: $OUT"
  rc=$FAILED
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$rc"
}

# ------------------------------------------------------------------------------ stages

versions() {
  local rc=0 tool
  need nvidia-smi
  case $? in 0) nvidia-smi || rc=1 ;; 1) rc=1 ;; esac
  for tool in nvcc compute-sanitizer; do
    need "$tool"
    case $? in 0) "$tool" --version | tail -n 2 ;; 1) rc=1 ;; esac
  done
  "$PY" - <<'EOF' || rc=1
import platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
  if [ "$DRY" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    say "FAILED: torch sees no CUDA device"
    rc=1
  fi
  git log -1 --format='commit %H %s' 2>/dev/null
  git status --short --untracked-files=no 2>/dev/null | head -n 20
  return $rc
}

build() {
  local cmd=("$PY" -m pip install --no-build-isolation --no-deps -v -e .)
  if [ "$DRY" = 1 ]; then
    would "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS ${cmd[*]}"
    say "checking the in-place build here instead"
  else
    need nvcc || return 1
    "${cmd[@]}" >"$OUT/build.log" 2>&1 || { tail -n 60 "$OUT/build.log"; return 1; }
    tail -n 3 "$OUT/build.log"
  fi
  # What the build holds, per family; a CUDA build without any CUDA kernel is a failure.
  "$PY" - "$DRY" <<'EOF'
import glob, sys
import torch
from rnnkernels import _kernels
dry = sys.argv[1] == "1"
any_cuda = False
for family in _kernels.FORWARD_OPS:
    cuda = _kernels.cuda_unsupported(family, torch.bfloat16)
    triton = _kernels.triton_unsupported(family, torch.bfloat16)
    any_cuda |= cuda is None
    print(f"{family:15} CUDA: {cuda or 'yes'}; Triton: {triton or 'yes'}")
if glob.glob("csrc/cuda/*.cu") and not any_cuda and not dry:
    sys.exit("FAILED: csrc/cuda has kernels but the build registered none (was CUDA found?)")
EOF
}

# Restrict mamba_ssm's setup.py to sm_90: it lists its architectures itself and ignores
# TORCH_CUDA_ARCH_LIST, and building all of them takes far longer than a call.
patch_mamba_sm90() {
  "$PY" - "$1" <<'EOF'
import re, sys
path = sys.argv[1]
text = open(path).read()
pair = re.compile(r'cc_flag\.append\("-gencode"\)\s*\n\s*cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)')
kept = []
def keep_sm90(m):
    if m.group(1) == "90":
        kept.append(m.group(1))
        return m.group(0)
    return "pass"
patched = pair.sub(keep_sm90, text)
if kept != ["90"]:
    sys.exit(f"FAILED: cannot restrict {path} to sm_90 (gencode pairs kept: {kept}); its layout changed")
open(path, "w").write(patched)
print(f"restricted {path} to sm_90")
EOF
}

mamba_prereqs() {
  "$PY" -c "import wheel, packaging" 2>/dev/null && return 0
  say "installing the carried wheel and packaging wheels from bench/vendor"
  if [ "$DRY" = 1 ]; then
    would "$PY -m pip install --no-index --find-links $VENDOR wheel packaging"
    ls "$VENDOR"/wheel-*.whl "$VENDOR"/packaging-*.whl >/dev/null 2>&1 && return 0
  else
    "$PY" -m pip install --no-index --find-links "$VENDOR" wheel packaging && return 0
  fi
  say "FAILED: mamba_ssm's build needs the wheel and packaging packages; carry their wheels in bench/vendor"
  return 1
}

mamba() {
  local wheel sdist work src build_cmd
  mkdir -p "$OUT/mamba"
  rm -f "$MAMBA_STATUS"
  if "$PY" -c "import selective_scan_cuda" 2>/dev/null; then
    say "mamba_ssm is already installed"
    echo 0 >"$MAMBA_STATUS"
    return 0
  fi
  wheel=$(ls -t "$VENDOR"/mamba_ssm-*.whl 2>/dev/null | head -n 1)
  sdist=$(ls -t "$VENDOR"/mamba_ssm-*.tar.gz 2>/dev/null | head -n 1)
  if [ -z "$wheel$sdist" ]; then
    say "NOTE: no mamba_ssm wheel or source archive in bench/vendor: the benchmarks run without it"
    echo absent >"$MAMBA_STATUS"
    return 0
  fi
  mamba_prereqs || return 1
  if [ -n "$wheel" ]; then
    if [ "$DRY" = 1 ]; then
      would "$PY -m pip install --no-deps $wheel"
      return 0
    fi
    "$PY" -m pip install --no-deps "$wheel" >"$OUT/mamba/install.log" 2>&1
    echo $? >"$MAMBA_STATUS"
    [ "$(cat "$MAMBA_STATUS")" = 0 ] || { tail -n 30 "$OUT/mamba/install.log"; return 1; }
    return 0
  fi
  work=$(mktemp -d)
  tar -xzf "$sdist" -C "$work" || { say "FAILED: cannot unpack $sdist"; return 1; }
  src=$(ls -d "$work"/mamba_ssm-* | head -n 1)
  patch_mamba_sm90 "$src/setup.py" || return 1
  build_cmd="cd '$src' && MAMBA_FORCE_BUILD=TRUE '$PY' -m pip wheel --no-build-isolation --no-deps -w '$OUT/mamba/wheel' . && '$PY' -m pip install --no-deps '$OUT'/mamba/wheel/mamba_ssm-*.whl"
  if [ "$DRY" = 1 ]; then
    would "(in the background) $build_cmd"
    rm -rf "$work"
    return 0
  fi
  need nvcc || return 1
  say "building mamba_ssm from $sdist in the background (log: $OUT/mamba/build.log)"
  setsid bash -c "($build_cmd) >'$OUT/mamba/build.log' 2>&1; echo \$? >'$MAMBA_STATUS'" &
  MAMBA_PID=$!
}

# Wait for the background mamba_ssm build (it writes its exit status into $MAMBA_STATUS) at
# most $1 seconds; a build still running then is left to finish() to stop.
wait_mamba() {
  local deadline=$((SECONDS + $1))
  [ -n "$MAMBA_PID" ] || return 0
  while [ ! -s "$MAMBA_STATUS" ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
  if [ ! -s "$MAMBA_STATUS" ]; then
    say "NOTE: the mamba_ssm build is not done after $1 s: the benchmarks run without it"
  elif [ "$(cat "$MAMBA_STATUS")" = 0 ]; then
    MAMBA_PID=""
    say "mamba_ssm built and installed (${SECONDS}s into the call)"
  else
    MAMBA_PID=""
    say "FAILED: the mamba_ssm build failed (exit $(cat "$MAMBA_STATUS" 2>/dev/null)); see $OUT/mamba/build.log"
    tail -n 30 "$OUT/mamba/build.log"
    SUMMARY+=("$(printf '%-9s FAIL %5ss  build failed' mamba-bg 0)")
    FAILED=1
  fi
}

tests() {
  local cmd=("$PY" -m pytest -m cuda -x -q -rs --junitxml="$OUT/pytest-cuda.xml" tests)
  local rc
  [ "$DRY" = 1 ] && say "DRY RUN: the CUDA tests are collected and skip here (no GPU)"
  "${cmd[@]}" 2>&1 | tee "$OUT/pytest-cuda.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 5 ]; then
    say "FAILED: no test carries the cuda marker, so nothing ran"
  fi
  return "$rc"
}

sanitize() {
  local cmd=(compute-sanitizer --tool memcheck --leak-check no --error-exitcode 1
             "$PY" -m bench.sanitize_cuda)
  if [ "$DRY" = 1 ]; then
    would "PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${cmd[*]}"
    "$PY" -m bench.sanitize_cuda --dry-run 2>&1 | tee "$OUT/sanitize.log"
    return "${PIPESTATUS[0]}"
  fi
  need compute-sanitizer || return 1
  # Without the caching allocator every tensor is its own allocation, so memcheck sees an
  # access past a tensor's end instead of landing in a neighbour inside a cached block.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${cmd[@]}" 2>&1 | tee "$OUT/sanitize.log"
  return "${PIPESTATUS[0]}"
}

bench() {
  local rc
  if [ "$DRY" = 1 ]; then
    say "the GPU configuration's cases (python -m bench --device cuda --list):"
    "$PY" -m bench --device cuda --list
    rc=$?
    would "$PY -m bench --device cuda --out $OUT/bench"
    say "the CPU plumbing instead (python -m bench --quick --device cpu):"
    "$PY" -m bench --quick --device cpu --out "$OUT/bench-dry" --no-progress >"$OUT/bench-dry.md" \
      || rc=1
    tail -n 5 "$OUT/bench-dry.md"
    return $rc
  fi
  wait_mamba "$MAMBA_WAIT_S"
  "$PY" -m bench --device cuda --out "$OUT/bench"
}

# ------------------------------------------------------------------------------ the pass

[ "$DRY" = 1 ] && say "DRY RUN: nothing that needs a GPU runs; such steps are printed"
say "stages:$WANT-> $OUT"
run_stage versions versions || { say "aborting: the machine is not fit for the pass"; finish; }
wants mamba && run_stage mamba mamba
if wants build; then
  run_stage build build || { say "aborting: nothing can run without the build"; finish; }
fi
wants test && run_stage test tests
wants sanitize && run_stage sanitize sanitize
wants bench && run_stage bench bench
# A mamba build started in this call and not awaited by the bench stage: give it the time left.
[ -n "$MAMBA_PID" ] && ! wants bench && wait_mamba "$MAMBA_WAIT_S"
finish
