#!/usr/bin/env bash
# The SmolLM2 proof on one GPU, in device calls of at most 10 minutes each:
#
#   phase 1: convert SmolLM2-135M-Instruct (GGUF) to SALA with the given softmax layers; calibrate throughput with
#            a few steps of every stage; size each stage's token budget to its share of TRAIN_SECONDS; train
#            until PHASE1_MINUTES (checkpointed).
#   phase 2: resume to the end (evaluation after every stage, export, trained delta), greedy chat answers of teacher
#            and hybrid, then pack the report.
#
# Usage (repo root, PYTHONPATH=src):
#   GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf RUN=/tmp/smol SPARSE=0,... bash scripts/smollm2_proof.sh 1
#   GGUF=... RUN=/tmp/smol OUT=$OUT bash scripts/smollm2_proof.sh 2
# Stage shares (seconds of the total): ALIGN_S, DISTILL_S, LONG_S (defaults: the late Dec 5 H200 run, 1.208x the teacher's
# ppl). SPARSE: the softmax layers, default HALO's picks from the CPU selection run
# (benchmarks/results/halo_smollm2_cpu_fixed/layer_selection.json: 0,4,8,16,17,18,19,29); a comma list converts with
# those layers (evenly spaced 0,4,8,12,16,20,25,29 reached 1.227x on Dec 5 with 480 s of distill); SPARSE=halo runs HALO
# layer selection on the GPU first (8 of 30 layers, first and last forced) and converts with its choice; any other
# layer_selection.json takes the choice of that selection run; PROFILE=N writes torch.profiler tables
# of N steps per stage of the calibration run ($RUN/calib/profile-<stage>.txt).
set -euo pipefail
export PYTHONPATH=${PYTHONPATH:-src}
PHASE=${1:?phase 1 or 2}
GGUF=${GGUF:?path of SmolLM2-135M-Instruct.Q4_1.gguf}
RUN=${RUN:-/tmp/smol}
OUT=${OUT:-$RUN/out}
SPARSE=${SPARSE:-benchmarks/results/halo_smollm2_cpu_fixed/layer_selection.json}
PROFILE=${PROFILE:-0}
CALIB=${CALIB:-}  # a calibration.json of an earlier run on the same card: skip the calibration run
ALIGN_S=${ALIGN_S:-70}
DISTILL_S=${DISTILL_S:-640}
LONG_S=${LONG_S:-75}
PHASE1_MINUTES=${PHASE1_MINUTES:-8.0}
PHASE2_MINUTES=${PHASE2_MINUTES:-8.6}
# tokens per optimizer step of each stage (seq_len x micro_batch of the smollm2 recipe)
ALIGN_STEP=${ALIGN_STEP:-$((512 * 64))}
DISTILL_STEP=${DISTILL_STEP:-$((2048 * 32))}
LONG_STEP=${LONG_STEP:-$((8192 * 8))}
SALA="python3 -m sala.cli -v"
mkdir -p "$RUN" "$OUT"
common=(--set "model.student=$RUN/converted" --set "model.teacher=$GGUF" --set "data.train=[\"data/text/train.txt\"]"
        --set "data.heldout=data/text/heldout.txt" --set "data.cache_dir=$RUN/tokens")

if [[ $PHASE == 1 ]]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
    if [[ -f $SPARSE ]]; then  # a layer_selection.json of an earlier `sala select-layers` run (e.g. on a CPU)
        SPARSE=$(python3 -c "import json, sys; print(','.join(map(str, json.load(open(sys.argv[1]))['sparse_layers'])))" "$SPARSE")
        echo "softmax layers from the selection file: $SPARSE"
    elif [[ $SPARSE == halo ]]; then
        echo "== HALO layer selection $(date +%T)"
        $SALA select-layers --from "$GGUF" --out "$RUN/selection" --text data/text/train.txt --num-sparse 8 \
            --device cuda --quiet 2>&1 | grep -vE "Warning|Loading|Converting" | tail -n 40
        SPARSE=$(python3 -c "import json; print(','.join(map(str, json.load(open('$RUN/selection/layer_selection.json'))['sparse_layers'])))")
        echo "HALO picked softmax layers $SPARSE"
    fi
    echo "== convert $(date +%T)"
    $SALA convert --from "$GGUF" --out "$RUN/converted" --sparse-layers "$SPARSE" --z-proj-init zeros \
        --context 32768 --device cuda 2>&1 | grep -v Warning | tail -n 6
    if [[ -n $CALIB ]]; then  # tokens/s per stage measured by an earlier run on the same card: saves a minute
        cp "$CALIB" "$RUN/calibration.json"
        echo "calibration from $CALIB: $(cat "$RUN/calibration.json")"
    else
        echo "== calibrate $(date +%T)"
        $SALA train smollm2 --out "$RUN/calib" --force --quiet --profile-steps "$PROFILE" "${common[@]}" \
            --set stages.align.tokens=$((ALIGN_STEP * 5)) --set stages.distill.tokens=$((DISTILL_STEP * 6)) \
            --set stages.long.tokens=$((LONG_STEP * 4)) --set stages.chat.tokens=$((2048 * 16 * 2)) \
            --set data.eval_windows=2 2>&1 | grep -E "stage|ppl|Error|error" || true
        python3 - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
recs = [json.loads(l) for l in (run / "calib" / "metrics.jsonl").read_text().splitlines()]
tps = {}
for stage in ("align", "distill", "long"):
    rows = [r["tokens_per_s"] for r in recs if r["stage"] == stage][2:]  # first steps include compilation
    tps[stage] = sorted(rows)[len(rows) // 2]
    mfu = [r["mfu"] for r in recs if r["stage"] == stage][2:]
    print(f"calibration {stage}: {tps[stage]:,.0f} tokens/s, MFU {sorted(mfu)[len(mfu) // 2]:.1%}")
(run / "calibration.json").write_text(json.dumps(tps))
EOF
    fi
    python3 - "$RUN" "$ALIGN_S" "$DISTILL_S" "$LONG_S" "$ALIGN_STEP" "$DISTILL_STEP" "$LONG_STEP" <<'EOF'
import json, sys
from pathlib import Path
run, shares = Path(sys.argv[1]), dict(zip(("align", "distill", "long"), map(float, sys.argv[2:5])))
tps = json.loads((run / "calibration.json").read_text())
per_step = dict(zip(("align", "distill", "long"), map(int, sys.argv[5:8])))
lines = []
for stage, secs in shares.items():
    steps = max(1, int(0.92 * tps[stage] * secs / per_step[stage]))
    lines.append(f"--set stages.{stage}.tokens={steps * per_step[stage]}")
    print(f"budget {stage}: {steps} steps, {steps * per_step[stage] / 1e6:.1f}M tokens (~{secs:.0f} s)")
(run / "budgets.args").write_text("\n".join(lines) + "\n")
EOF
    echo "== train (phase 1) $(date +%T)"
    # shellcheck disable=SC2046
    $SALA train smollm2 --out "$RUN/run" --force --quiet --max-minutes "$PHASE1_MINUTES" "${common[@]}" \
        $(cat "$RUN/budgets.args") 2>&1 | grep -vE "Warning|Loading|Converting" | tail -n 12
    tail -n 3 "$RUN/run/metrics.jsonl"
else
    echo "== train (phase 2) $(date +%T)"
    # shellcheck disable=SC2046
    $SALA train smollm2 --out "$RUN/run" --resume --quiet --max-minutes "$PHASE2_MINUTES" "${common[@]}" \
        $(cat "$RUN/budgets.args") 2>&1 | grep -vE "Warning|Loading|Converting" | tail -n 12
    echo "== chat $(date +%T)"
    python3 benchmarks/chat_samples.py --teacher "$GGUF" --hybrid "$RUN/run/final" --out "$RUN/run/chat_samples.md" || true
    cp "$RUN/run/delta/"* "$OUT/" 2>/dev/null || true
    cp "$RUN/run/loss_curves.png" "$OUT/" 2>/dev/null || true
    cp "$RUN/converted/conversion.json" "$RUN/run/" 2>/dev/null || true
    cp "$RUN/calibration.json" "$RUN/budgets.args" "$RUN/run/" 2>/dev/null || true
    tar czf "$OUT/report.tar.gz" -C "$RUN/run" evals.json metrics.jsonl results.json run.json chat_samples.md \
        conversion.json calibration.json budgets.args 2>/dev/null || true
    cat "$RUN/run/evals.json" || true
    cat "$RUN/run/chat_samples.md" || true
fi
