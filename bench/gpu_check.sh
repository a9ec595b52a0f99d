#!/usr/bin/env bash
# The one GPU check of this release (a lent H100/H200; the device time of a task is short):
#
#   1. SampleGram with backend="triton" on the engine's zoo, Triton compiled
#      (TRITON_INTERPRET=0; tests/test_sample_gram_triton.py): the gate of the table;
#   2. the whole-step table (bench/gpu_step_bench.py): record + gram + combine, Triton vs
#      torch backend vs plain forward+backward vs the authors' path vs TorchJD, on the MLP
#      4096, ResNet-18's convolutions, ViT-S/16's and GPT-2 small's linears, B = 64 + 64;
#   3. the Gram kernels on their own, compiled, bf16 included (tests/test_gram_kernels.py);
#   4. tests on CUDA with the default backend ("auto" = the Triton kernels there):
#      SampleGram/OrthoGrad (tests/test_sample_gram_gpu.py), unlearn()
#      (tests/test_toolkit_gpu.py), the projection kernels (tests/test_projection_gpu.py);
#   5. the per-layer Gram kernel table (bench/gpu_gram_bench.py);
#   6. if time is left: the projection timings (bench/gpu_bench.py) and the peer step
#      table (bench/peers_gpu.py).
#
# Every section runs under its own time limit, cut to what is left of the whole budget
# (GPU_CHECK_BUDGET_S, default 470 s: under 8 minutes with the machine's start); a section
# that fails or times out is reported and the next one runs; rows are printed as they
# finish (unbuffered), and the whole output is also written to $OUT/gpu_check.log (or
# /tmp). Uses the machine's own python3 (torch, triton, pytest; no registry there, so
# nothing is installed: TorchJD and the CPU peers' libraries are reported as not
# installed) with the checkout on PYTHONPATH. Exit status 1 if any section failed.
# Copy the output, with the card and the commit, into bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
exec > >(tee "${OUT:-/tmp}/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
status=0

# section NAME MAX_SECONDS COMMAND...: run COMMAND under min(MAX, what is left), report
section() {
  local name=$1 max=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 15)); then
    echo "== $name: not run (time budget: ${left} s left) =="
    status=1
    return
  fi
  local limit=$((max < left ? max : left)) t0=$SECONDS rc
  echo "== $name (limit ${limit} s, at ${SECONDS} s) =="
  timeout -k 5 "$limit" "$@"
  rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "-- $name: stopped at its limit (${limit} s)"
    status=1
  elif ((rc != 0)); then
    echo "-- $name: FAILED (exit $rc, $((SECONDS - t0)) s)"
    status=1
  else
    echo "-- $name: ok ($((SECONDS - t0)) s)"
  fi
}

echo "== machine =="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)" || true
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' + uncommitted changes')"

PYTEST=($PY -m pytest -q -p no:cacheprovider --durations=5)
section "tests: SampleGram backend='triton', compiled" 100 "${PYTEST[@]}" tests/test_sample_gram_triton.py
section "whole-step table (ms, medians)" 170 $PY bench/gpu_step_bench.py --budget-s 140
section "tests: Gram kernels, compiled" 80 "${PYTEST[@]}" tests/test_gram_kernels.py
section "tests on CUDA, default backend: SampleGram, OrthoGrad, unlearn, projection" 120 \
  "${PYTEST[@]}" tests/test_sample_gram_gpu.py tests/test_toolkit_gpu.py tests/test_projection_gpu.py
section "per-layer Gram kernels (ms, medians)" 90 \
  $PY bench/gpu_gram_bench.py --budget-s 60
section "projection timings (ms, medians)" 60 $PY bench/gpu_bench.py
section "peer step table" 60 $PY bench/peers_gpu.py --budget-s 40 --json "${OUT:-/tmp}/peers-gpu.json"
echo "== done in ${SECONDS} s (exit $status) =="
exit $status
