#!/usr/bin/env bash
# A dress rehearsal of `sala train smollm2` on a random SmolLM2-shaped teacher: convert, then a few steps of
# every stage under torch.profiler (kernel table and host table per stage), throughput and MFU per step.
#
#   PYTHONPATH=src RUN=/tmp/rt OUT=/tmp/rt/out bash scripts/profile_train.sh
set -euo pipefail
export PYTHONPATH=${PYTHONPATH:-src}
RUN=${RUN:-/tmp/rt}
OUT=${OUT:-$RUN/out}
STEPS=${STEPS:-4}
mkdir -p "$RUN" "$OUT"
python3 benchmarks/random_teacher.py "$RUN/teacher"
python3 -m sala.cli convert --from "$RUN/teacher" --out "$RUN/converted" --sparse-layers 0,4,8,12,16,20,25,29 \
    --z-proj-init zeros --context 32768 --device "${DEVICE:-cuda}" --force 2>&1 | tail -n 2
n=$((STEPS + 3))
python3 -m sala.cli -v train smollm2 --out "$RUN/run" --force --quiet --profile-steps "$STEPS" \
    --set "model.student=$RUN/converted" --set "model.teacher=$RUN/teacher" --set 'data.train=["data/text/train.txt"]' \
    --set data.heldout=data/text/heldout.txt --set data.eval_windows=2 --set "data.cache_dir=$RUN/tokens" \
    --set "stages.align.tokens=$((512 * 64 * n))" --set "stages.distill.tokens=$((2048 * 32 * n))" \
    --set "stages.long.tokens=$((8192 * 8 * n))" ${EXTRA:-} 2>&1 | grep -vE "Warning|Loading|Converting" | tail -n 30
python3 - "$RUN/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for stage in dict.fromkeys(r["stage"] for r in rows):
    rs = [r for r in rows if r["stage"] == stage][2:]
    tps = sorted(r["tokens_per_s"] for r in rs)[len(rs) // 2]
    mfu = sorted(r["mfu"] or 0 for r in rs)[len(rs) // 2]
    print(f"{stage}: median {tps:,.0f} tokens/s, MFU {mfu:.1%}")
PY
cp "$RUN"/run/profile-*.txt "$RUN/run/metrics.jsonl" "$OUT/"
