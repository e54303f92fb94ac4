#!/usr/bin/env bash
# One device call that checks and times what was built without a GPU: GPU tests (graphs, fused decode vs
# eager vs model, Triton kernels incl. the sparse backward), the per-layer decode-attention table (fused batch
# in a graph vs per-sequence eager), the sparse backward table (Triton vs PyTorch recompute), and decode-only
# e2e rows for sala (pieces and fused) and the dense baseline, then real-prefill TTFT at 256K and 1M. Each step logs to $OUT/<step>.log, so a run cut
# short by the device's time limit still returns what finished.
# Usage on the device machine, repo root:  OUT=out [STEPS="tests e2e_sala"] bash scripts/gpu_check.sh
set -uo pipefail
export PYTHONPATH=src
OUT=${OUT:-out}
mkdir -p "$OUT"
STEPS=${STEPS:-all}  # space-separated step names to run, or "all"
step() {  # step NAME COMMAND...: run, keep the whole log, show its tail
    local name=$1; shift
    [[ $STEPS == all || " $STEPS " == *" $name "* ]] || return 0
    echo "== $name  $(date +%T)"
    "$@" > "$OUT/$name.log" 2>&1
    echo "   rc $?"; tail -n 14 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
step tests python -m pytest -q -x -p no:cacheprovider tests/ops/test_decode_batch.py tests/engine/test_cuda_graphs.py \
    tests/ops/test_norm.py tests/ops/test_rope.py tests/ops/test_triton_infllm_v2.py tests/ops/test_elementwise.py \
    tests/ops/test_triton_lightning.py tests/model/test_fused_projections.py
step kernels_decode python benchmarks/kernels.py --only decode --out "$OUT"
step sparse_backward python -c "import sys; sys.path.insert(0, 'benchmarks'); import kernels; kernels.bench_sparse_backward()"
step e2e_sala python -m sala.cli bench e2e --systems sala --contexts 32K,256K,1M --decode-only --decode-steps 16 \
    --decode-batch 8 --decode-attention pieces --out "$OUT/e2e_decode"
step e2e_sala_fused python -m sala.cli bench e2e --systems sala --contexts 32K,256K,1M --decode-only --decode-steps 16 \
    --decode-batch 8 --decode-attention fused --out "$OUT/e2e_decode_fused"
step e2e_dense python -m sala.cli bench e2e --systems dense --contexts 32K,256K --decode-only --decode-steps 16 \
    --decode-batch 8 --decode-attention pieces --out "$OUT/e2e_decode_dense_pieces"
step e2e_dense_fused python -m sala.cli bench e2e --systems dense --contexts 32K,256K --decode-only --decode-steps 16 \
    --decode-batch 8 --decode-attention fused --out "$OUT/e2e_decode_dense"
# where a step's kernel time goes (decode at 256K, fused; one 8K prefill chunk after 512K tokens)
step profile_decode timeout 180 python benchmarks/profile_step.py --context 256K
step profile_prefill timeout 180 python benchmarks/profile_step.py --context 512K --prefill 8192 --steps 2
# the record: TTFT and decode for sala and the fair dense baseline in one run
step e2e_record python -m sala.cli -v bench e2e --systems sala,dense --contexts 32K,256K,1M --decode-steps 16 \
    --decode-batch 8 --decode-attention fused --out "$OUT/e2e_record"
# last (longest): real prefills, TTFT at 256K and the 1M target (fused norms/RoPE change the prefill too)
step e2e_ttft python -m sala.cli bench e2e --systems sala --contexts 256K,1M --decode-steps 4 --decode-batch 1 \
    --decode-attention fused --out "$OUT/e2e_ttft"
