#!/usr/bin/env bash
# The one GPU check (a lent H100/H200, ~15 min of device time per task): the Triton tests
# compiled for CUDA, then the timing table. Uses the machine's own python3 (torch, triton,
# pytest preinstalled; no registry there): nothing is installed, the checkout is put on
# PYTHONPATH. Budget: under 8 minutes. Prints the table last; copy it, with the card and
# the commit, into bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0
echo "== machine =="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
status=0
echo "== tests on CUDA: Triton projection kernels, SampleGram and OrthoGrad =="
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_projection_gpu.py tests/test_sample_gram_gpu.py tests/test_toolkit_gpu.py || status=1
timeout 150 python3 bench/peers_gpu.py --json "${OUT:-/tmp}/peers-gpu.json" || status=1
echo "== timings (ms, medians of triton.testing.do_bench) =="
timeout 150 python3 bench/gpu_bench.py || status=1
exit $status
