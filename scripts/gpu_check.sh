#!/usr/bin/env bash
# One device call that checks and times what was built without a GPU: GPU tests (graphs, fused decode vs
# eager vs model, Triton kernels incl. the sparse backward), the per-layer decode-attention table (fused batch
# in a graph vs per-sequence eager), the sparse backward table (Triton vs PyTorch recompute), and decode-only
# e2e rows for sala (pieces and fused) and the dense baseline. Writes under $OUT.
# Usage on the device machine, repo root:  OUT=out bash scripts/gpu_check.sh
set -uo pipefail
export PYTHONPATH=src
OUT=${OUT:-out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
python -m pytest -q -x -p no:cacheprovider tests/ops/test_decode_batch.py tests/engine/test_cuda_graphs.py \
    tests/ops/test_triton_infllm_v2.py 2>&1 | tail -15
python benchmarks/kernels.py --only decode --out "$OUT" 2>&1 | tail -20
python -c "import sys; sys.argv=['k']; sys.path.insert(0, 'benchmarks'); import kernels as k; k.bench_sparse_backward()" 2>&1 | tail -8
for mode in "" "--fused-decode"; do
    python -m sala.cli bench e2e --systems sala --contexts 32K,256K,1M --decode-only --decode-steps 16 \
        --decode-batch 8 $mode --out "$OUT/e2e_decode${mode:+_fused}" 2>&1 | tail -6
done
python -m sala.cli bench e2e --systems dense --contexts 32K,256K --decode-only --decode-steps 16 --decode-batch 8 \
    --fused-decode --out "$OUT/e2e_decode_dense" 2>&1 | tail -6
