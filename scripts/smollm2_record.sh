#!/usr/bin/env bash
# The evaluation record of SmolLM2-135M-Instruct and its trained SALA hybrid on one GPU (benchmarks/RESULTS.md):
# held-out perplexity at 2K and 8K, and NIAH at 1K-8K (the teacher's window) and 16K-64K (past it) for both.
# The teacher runs past its 8K window by RoPE extrapolation (--max-positions); the hybrid's sparse layers carry no
# positions. Each command is bounded by `timeout` so a device call cut short still returns the other's report.
# Usage (repo root): GGUF=/path/model.gguf HYBRID=<hybrid folder | delta folder> OUT=out [TAR=record.tar.gz] \
#     bash scripts/smollm2_record.sh
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-src}
GGUF=${GGUF:?teacher .gguf}
HYBRID=${HYBRID:?trained hybrid folder}
OUT=${OUT:-out/record}
TEXT=${TEXT:-data/text/heldout.txt}
SAMPLES=${SAMPLES:-4}
PPL_S=${PPL_S:-90}
CONTEXTS=${CONTEXTS:-2K,8K}
LENGTHS=${LENGTHS:-1K,2K,4K,8K,16K,32K,64K}
DEPTHS=${DEPTHS:-0,25,50,75,100}
NIAH_S=${NIAH_S:-300}
mkdir -p "$OUT"
if [[ -f $HYBRID/delta.json ]]; then  # a trained delta (e.g. the bundled one): convert the teacher, merge it
    python3 - "$GGUF" "$HYBRID" "$OUT/sala-hybrid" <<'PY'
import sys
import torch
from sala.demo.models import load_models
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
m = load_models(model=sys.argv[1], delta=sys.argv[2], conversion=None, sparse_layers=None, device=dev,
                dtype=torch.bfloat16)
m.hybrid.save_pretrained(sys.argv[3])
m.tokenizer.save_pretrained(sys.argv[3])
print(f"{m.hybrid_label}: {sys.argv[3]} (base {m.converted})")
PY
    HYBRID=$OUT/sala-hybrid
fi
echo "== ppl $(date +%T)"
timeout "$PPL_S" python3 -m sala.cli eval ppl --model "$GGUF" --compare "$HYBRID" --text "$TEXT" --context "$CONTEXTS" \
    --max-windows 16 --batch 4 --chunk 8192 --out "$OUT/ppl" --force --quiet 2>&1 | grep -v Warning | tail -n 12
echo "== niah $(date +%T)"
timeout "$NIAH_S" python3 -m sala.cli eval niah --model "$GGUF" --compare "$HYBRID" --haystack "$TEXT" \
    --lengths "$LENGTHS" --depths "$DEPTHS" --samples "$SAMPLES" --chunk 8192 \
    --max-positions 65536 --out "$OUT/niah" --force --quiet 2>&1 | grep -v Warning | tail -n 30
if [[ -n ${TAR:-} ]]; then  # one file back instead of six (device calls return at most 8 files)
    # the archive may sit inside OUT: leave it out of itself
    tar czf "$TAR" --exclude=sala-hybrid --exclude="$(basename "$TAR")" -C "$OUT" . && echo "packed $OUT into $TAR"
fi
