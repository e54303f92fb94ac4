#!/usr/bin/env bash
# The GPU checks left open by CPU-only sessions (issues 14 and 15), one step per log in $OUT, so a device call cut
# short still returns what finished. Each group fits one device call of 10 minutes:
#   STEPS="tests before_after"      GPU tests of the new paths; issue 14's decode record, old code vs new
#   STEPS="gemm fp8_rowwise dense"  fp8 GEMMs vs bf16 per shape; row-wise fp8 end to end; the dense split's effect
#   STEPS="fp8"                     bf16 vs fp8 vs dense vs transformers at 128K/256K
#   STEPS="cold"                    first-request TTFT after load (cold process, then warm process) and 1M
#   STEPS="profile_fp8"             kernel time of one decode step at 256K, bf16 then fp8
#   STEPS="profile_prefill"         kernel time of one 8K prefill chunk after 128K tokens (a 256K prompt's mean chunk)
#   STEPS="gemv e2e256"             decode GEMM launch plans vs cuBLAS per 9B shape; bf16 vs fp8 end to end at 256K
#   STEPS="kl"                      the training KL kernel vs its PyTorch reference (issue 11's distill step)
#   STEPS="soak"                    issue 17: sala serve, 9B shape, 64 streams at 1K-63K-token prompts (needs
#                                   fastapi, uvicorn and httpx importable: PYTHONPATH is kept after src)
# The before/after step needs the old tree: git archive 81d35b6 src | tar -x -C .before/ (carry .before).
# Usage on the device machine, repo root:  OUT=out STEPS="tests before_after" bash scripts/gpu_issue15.sh
set -uo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}
mkdir -p "$OUT"
STEPS=${STEPS:-all}
step() {
    local name=$1; shift
    [[ $STEPS == all || " $STEPS " == *" $name "* ]] || return 0
    echo "== $name  $(date +%T)"
    "$@" > "$OUT/$name.log" 2>&1
    echo "   rc $?"; tail -n 16 "$OUT/$name.log"
}
sala() { python -m sala.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
export SALA_CACHE_DIR=$OUT/cache  # tuning picks of this run, returned with the logs

# -- tests: fp8 GEMMs, the cuDNN split, precompile, cache protocol, fused decode, CUDA graphs
group_tests_fp8() {
    python -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_fp8.py tests/model/test_quantize.py
}
step tests_fp8 group_tests_fp8
group_tests() {
    python -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_fp8.py tests/model/test_quantize.py \
        tests/ops/test_dense_sdpa.py tests/engine/test_fused_decode.py tests/engine/test_cuda_graphs.py \
        tests/model/test_cache_protocol.py tests/ops/test_varlen_attention.py tests/ops/test_precompile.py \
        tests/ops/test_kl.py
}
step tests group_tests
# -- issue 14: decode at 256K before (81d35b6) and after the one-forward redesign, same machine, same run
step before_after bash -c 'for tree in .before/src src; do echo "## $tree"; PYTHONPATH=$tree python -m sala.cli \
    bench e2e --systems sala --contexts 256K --decode-only --decode-steps 32 --decode-batch 8 \
    --out "'"$OUT"'/e2e_$(basename $(dirname $tree))" | tail -n 6; done'
# -- issue 15: where fp8 loses to bf16 (Dec 5, H200: TTFT x2.1, decode x1.27): each fp8 GEMM path, its activation
#    quantisation and the group kernel alone against cuBLAS bf16 at decode and prefill M, 9B projection shapes
step gemm python benchmarks/kernels.py --only fp8 --out "$OUT/kernels"
# -- issue 15: where an fp8 decode step's time goes (5.77 ms against a 2.30 ms weight-read floor), bf16 beside it
step profile_fp8 bash -c 'for q in none fp8; do timeout 200 python benchmarks/profile_step.py --context 256K \
    --quantize $q --top 30; done'
step profile_prefill bash -c 'for q in none fp8; do timeout 200 python benchmarks/profile_step.py --context 128K \
    --prefill 8192 --quantize $q --steps 2 --top 30; done'
step e2e256 sala bench e2e --systems sala,sala-fp8 --contexts 256K --decode-steps 16 --decode-batch 8 \
    --out "$OUT/e2e_256k"
# -- issue 15: decode GEMMs, every launch plan against cuBLAS bf16, weights rotated past the L2
step gemv env PYTHONPATH=benchmarks:$PYTHONPATH python benchmarks/decode_gemv.py
# -- issue 11: the distillation KL kernel against the PyTorch passes it replaced (SmolLM2 vocabulary)
step kl python benchmarks/kernels.py --only kl --out "$OUT/kernels"
# -- issue 15: bf16 vs fp8 (groups of 128, and row-wise) vs the dense systems
step fp8 sala -v bench e2e --systems sala,sala-fp8,dense,hf --contexts 128K,256K --decode-steps 16 --decode-batch 8 \
    --out "$OUT/e2e_fp8"
step fp8_rowwise sala bench e2e --systems sala-fp8 --fp8-group-size 0 --contexts 256K --decode-steps 16 \
    --decode-batch 8 --out "$OUT/e2e_fp8_rowwise"
step dense bash -c 'for split in 0 1; do echo "## SALA_CUDNN_SPLIT=$split"; SALA_CUDNN_SPLIT=$split python -m sala.cli \
    bench e2e --systems dense --contexts 128K --decode-steps 4 --decode-batch 1 --out "'"$OUT"'/e2e_dense_$split" \
    | tail -n 4; done'
# -- cold start: a fresh process (empty caches), then another one with the caches the first one left
step cold bash -c 'for run in cold warm; do echo "## $run process"; python -m sala.cli warmup --model minicpm-sala-9b \
    --prompt-tokens 128K --context 132K; done'
step prefill_1m sala bench e2e --systems sala,sala-fp8 --contexts 1M --decode-steps 8 --decode-batch 1 --out "$OUT/e2e_1m"
# -- issue 17: the server under 64 concurrent streams of mixed 1K-63K-token prompts, disconnects and cancels
step soak python benchmarks/serve_load.py --device cuda --preset minicpm-sala-9b --batch 64 --context 64K \
    --concurrency 64 --prompt-words 340 21500 --max-tokens 256 --start-timeout 200 --duration "${SOAK_S:-60}" \
    --requests 400 --timeout 400 --label gpu-9b-64streams --out "$OUT/soak_gpu.jsonl"
