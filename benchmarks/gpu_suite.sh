#!/usr/bin/env bash
# The GPU suite in one call, for a machine with one CUDA GPU (H100/H200) and no network:
#   benchmarks/gpu_suite.sh RESULTS.md
# 1. installs this checkout in place (no dependencies, no build isolation: nothing is downloaded);
# 2. runs the `gpu`-marked tests (Triton compiled for real, bf16/fp16, large cases);
# 3. times the Triton backend against FlexAttention (compiled, same block mask) and SDPA
#    (FlashAttention: is_causal for causal, dense otherwise), one pattern per process so a slow
#    pattern cannot take the others' results with it;
# 4. writes a Markdown report (device, versions, test summary, timing tables) to RESULTS.md.
# Budget: under 8 minutes in all (tests 170 s, each of the four sweeps 70 s). Any failure exits non-zero with
# the step named; the report so far is still written.
set -euo pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh RESULTS.md}
cd "$(dirname "$0")/.."
ROOT=$(pwd)
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
PY=${PYTHON:-python3}
LOG=$(mktemp -d)
FAILED=()
START=$(date +%s)

fail() { echo "gpu_suite: FAILED: $*" >&2; FAILED+=("$*"); }
elapsed() { echo $(( $(date +%s) - START )); }

echo "gpu_suite: installing the checkout (pip install -e . --no-deps --no-build-isolation)" >&2
"$PY" -m pip install --quiet -e . --no-deps --no-build-isolation \
    || { echo "gpu_suite: FAILED: pip install -e . (is setuptools installed?)" >&2; exit 1; }

unset TRITON_INTERPRET  # real kernels, never the interpreter
"$PY" - <<'EOF' || { echo "gpu_suite: FAILED: no usable CUDA device / triton" >&2; exit 1; }
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: this suite needs a CUDA GPU")
import triton  # noqa: F401  (the Triton backend must import)
print(f"gpu_suite: {torch.cuda.get_device_name(0)}", file=sys.stderr)
EOF

{
  echo "# GPU suite"
  echo
  "$PY" - <<'EOF'
import subprocess, torch, triton
import attncompiler as ac
p = torch.cuda.get_device_properties(0)
print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
print(f"- torch {torch.__version__}, triton {triton.__version__}, attncompiler {ac.__version__}")
try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"- commit {rev or 'unknown'}")
except OSError:
    pass
EOF
  echo "- command: \`benchmarks/gpu_suite.sh $(basename "$OUT")\`"
  echo
} > "$OUT"

echo "gpu_suite: gpu-marked tests ($(elapsed) s)" >&2
set +e
# only the files that carry the marker: collecting the whole suite costs a minute
GPU_FILES=$(grep -l "pytest.mark.gpu" tests/test_*.py)
timeout 170 "$PY" -m pytest -m gpu -q -p no:cacheprovider $GPU_FILES > "$LOG/tests.txt" 2>&1
rc=$?
set -e
tail -n 5 "$LOG/tests.txt" >&2
[ $rc -eq 0 ] || fail "gpu-marked tests (exit $rc, 124 = timeout); see the report"
{
  echo "## gpu-marked tests"
  echo
  echo '```'
  grep -E "passed|failed|error|FAILED|ERROR" "$LOG/tests.txt" | tail -n 20 || tail -n 20 "$LOG/tests.txt"
  echo '```'
  echo
  echo "## Triton backend vs FlexAttention and SDPA (bf16, B=1, H=16, D=64, medians)"
  echo
} >> "$OUT"

# One process per pattern (FlexAttention compiles per shape; a hang costs one pattern only).
FIRST=1
for pattern in causal sliding_window bigbird longformer; do
  echo "gpu_suite: triton sweep $pattern ($(elapsed) s)" >&2
  set +e
  timeout 70 "$PY" -m attncompiler.bench.triton --quick --pattern "$pattern" > "$LOG/$pattern.md" 2> "$LOG/$pattern.err"
  rc=$?
  set -e
  if [ $rc -ne 0 ]; then
    fail "triton sweep $pattern (exit $rc, 124 = timeout): $(tail -n 1 "$LOG/$pattern.err")"
    echo "- $pattern: FAILED (exit $rc)" >> "$OUT"
    continue
  fi
  if [ $FIRST -eq 1 ]; then grep '^|' "$LOG/$pattern.md" >> "$OUT"; FIRST=0
  else grep '^|' "$LOG/$pattern.md" | tail -n +3 >> "$OUT"; fi
done

{
  echo
  echo "x flex / x sdpa: the peer's median over ours (> 1: the Triton backend is faster)."
  echo "Total wall time: $(elapsed) s."
} >> "$OUT"

if [ ${#FAILED[@]} -ne 0 ]; then
  { echo; echo "## FAILED"; printf -- '- %s\n' "${FAILED[@]}"; } >> "$OUT"
  echo "gpu_suite: ${#FAILED[@]} step(s) failed; report in $OUT" >&2
  exit 1
fi
echo "gpu_suite: done in $(elapsed) s; report in $OUT" >&2
