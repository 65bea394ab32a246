#!/bin/bash
# How the shipped weights/ and baseline/ were made (2-core CPU, about 90 min in all):
# 12 simulated subjects; 8 seeds of the dual-encoder member and 3 of the frame-pair
# baseline trained 1,500 steps in parallel processes (one torch thread each) on one
# shared cache; the most promising continued twice with --resume --steps (a warm restart
# of the cosine schedule); then the 4 members and the 1 baseline with the lowest GPE on
# the held-out validation subject 011 exported. The benchmark's subjects (100, 101) and
# the demo's (50) are never trained or validated on.
#
# Training is deterministic on the CPU for a given config and data, so this should give
# the shipped files bit for bit: the cmp at the end says whether it did. The shipped
# members drew their clips with the sequential sampler (one generator in the training
# loop; their manifest entries have no "sampling" key, which means that); configs/*.json
# now say "per-clip" (a generator per clip, drawn by data-loader workers), which draws
# other clips: the script trains from copies of the configs that say "sequential". The shipped
# files came from these commands run by hand; the script has not been rerun in one go.
# One member alone is retrained from its manifest entry (config and trained.schedule):
#   .venv/bin/tusrec train runs/data --out runs/again --config weights/manifest.json \
#       --name member3 --threads 1
#
#   bash scripts/train-shipped.sh [RUNS]      # RUNS defaults to runs/; writes RUNS/weights, RUNS/baseline
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
T=".venv/bin/python -m tusrec"
DATA=$RUNS/data
mkdir -p "$RUNS"
.venv/bin/python - "$RUNS" <<'EOF'
import json, sys
for name in ("member", "pair"):
    with open(f"configs/{name}.json") as f:
        config = json.load(f)
    config["sampling"] = "sequential"
    with open(f"{sys.argv[1]}/{name}-sequential.json", "w") as f:
        f.write(json.dumps(config, indent=2) + "\n")
EOF
MEMBER=$RUNS/member-sequential.json
PAIR=$RUNS/pair-sequential.json

# Subjects 000-004: 24 sweeps of 120 frames; 005-011: 120-240 frames; all 12: both
# 2025 rotation scans of 200-300 frames. 312 scans, 50,134 frames (11 subjects train).
$T simulate "$DATA" --layout train --subjects 0-4 --frames 120 --no-landmarks
$T simulate "$DATA" --layout train --subjects 5-11 --frames 120-240 --no-landmarks
$T simulate "$DATA" --layout train --subjects 0-11 --frames 200-300 --protocol 2025 --no-landmarks

train() {  # name config seed weights-folder steps
  $T train "$DATA" --out "$RUNS/ens/$1" --config "$2" --name "$1" --seed "$3" --steps "$5" \
    --weights "$RUNS/ens/$4" --cache "$RUNS/cache" --threads 1 --resume >> "$RUNS/$1.log" 2>&1
}
# Build the shared cache once (64x80 frames + decorrelation maps of steps 1-2), so the
# parallel runs only read it.
.venv/bin/python -c "
from tusrec.train.cache import load_cache
from tusrec.train.config import TrainConfig
from tusrec.train.trainer import cache_steps
cfg = TrainConfig.load('$MEMBER')
load_cache('$DATA', cfg.model_config.input_size, None, True, cache_steps(cfg), '$RUNS/cache')
"
# Round 1 and 2: 5 and 6 processes on 2 cores (18 min each here). Seeds 1 and 2 and
# every pair seed stayed on the no-motion plateau.
for i in 0 1 2 3; do train member$i $MEMBER $i weights 1500 & done
train pair $PAIR 0 baseline 1500 &
wait
for i in 4 5 6 7; do train member$i $MEMBER $i weights 1500 & done
for i in 1 2; do train pair$i $PAIR $i baseline 1500 & done
wait
# Round 3 and 4: the 4 best members continued to 3,000 then 4,500 steps, and member 7
# to 3,000 (10 and 16 min here). Each run keeps its best checkpoint across rounds.
for i in 3 6 5 0; do train member$i $MEMBER $i weights 3000 & done
wait
for i in 3 6 5 0; do train member$i $MEMBER $i weights 4500 & done
train member7 $MEMBER 7 weights 3000 &
wait
# The best baseline seed (1) given the best member's budget: 3,000 then 4,500 steps (13 min).
train pair1 $PAIR 1 baseline 3000
train pair1 $PAIR 1 baseline 4500
$T weights "$RUNS/ens/weights"
$T weights "$RUNS/ens/weights" --export "$RUNS/weights" --top 4
$T weights "$RUNS/ens/baseline" --export "$RUNS/baseline" --top 1
# The same files as the shipped ones (the manifests differ only in data_root and the
# sampling key).
for f in weights/*.pt baseline/*.pt; do
  cmp "$f" "$RUNS/$f" && echo "$f: identical"
done
