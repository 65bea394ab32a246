#!/bin/bash
# The ensemble make-ups of the README's Levers table that were tried and not shipped:
# 4 more seeds of the shipped recipe (len0, len1, len4, len7) and 4 frame-pair members
# bagged like the shipped ones (pairb2, pairb3, pairb5, pairb6), all with error heads,
# then every make-up scored on the validation subject 011 at its own lengths and at the
# benchmark's 300 frames (research/validation-diversity*.json). Run after
# scripts/train-shipped.sh, on its data and cache; 2026-12-04 on the 2-core CPU: 745-774 s
# of training a seed member, 652-748 s a pair member (2 side by side), each validation
# run about 16-26 min (2 side by side).
# Then (2026-12-05) a second validation subject, 012, for the 4 len + 4 pair make-up
# (research/validation-012-rule.md), and the shipped 4 trained with a 4,500-step
# schedule (research/validation-long-rule.md; about 34 min a run, 2 side by side).
# Then (2026-12-05, later) multi-step decorrelation and a clip-length curriculum
# (research/validation-multistep-rule.md, validation-curriculum-rule.md).
#
#   bash scripts/train-diversity.sh [RUNS]      # RUNS as for train-shipped.sh (default runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
T=".venv/bin/python -m tusrec"
DATA=$RUNS/data

train() {  # name config seed weights-folder validation-subjects
  $T train "$DATA" --out "$RUNS/ens/$1" --config "$2" --name "$1" --seed "$3" \
    --weights "$RUNS/ens/$4" --val-subjects "$5" --cache "$RUNS/cache" --threads 1 \
    --workers 1 --resume >> "$RUNS/$1.log" 2>&1
}
(train len0 configs/member.json 0 extra 011,000,001
 train len4 configs/member.json 4 extra 011,004,005
 train pairb6 configs/pair.json 6 pairs 011,000,001
 train pairb2 configs/pair.json 2 pairs 011,004,005) &
train len1 configs/member.json 1 extra 011,002,003
train len7 configs/member.json 7 extra 011,006,007
train pairb5 configs/pair.json 5 pairs 011,002,003
train pairb3 configs/pair.json 3 pairs 011,006,007
wait
mkdir -p "$RUNS/pairhead"
cp baseline/manifest.json baseline/pair0.pt "$RUNS/pairhead/"
for w in extra pairs; do
  $T error-head "$RUNS/ens/$w" "$DATA" --cache "$RUNS/cache" --threads 1 >> "$RUNS/error-head.log" 2>&1
done
$T error-head "$RUNS/pairhead" "$DATA" --cache "$RUNS/cache" --threads 1 >> "$RUNS/error-head.log" 2>&1

# 011 again at the benchmark's 300 frames a scan
$T simulate "$RUNS/sim011-300" --layout train --subjects 11 --frames 300 --no-landmarks
$T simulate "$RUNS/sim011-300" --layout train --subjects 11 --frames 300 --protocol 2025 --no-landmarks
L4=weights/len2,weights/len3,weights/len5,weights/len6
X4=extra/len0,extra/len1,extra/len4,extra/len7
P4=pairs/pairb2,pairs/pairb3,pairs/pairb5,pairs/pairb6
args=(--weights weights "$RUNS/ens/extra" "$RUNS/pairhead" "$RUNS/ens/pairs" --top
  --combo "len4-shipped=$L4" --combo "len8=$L4,$X4" --combo "len4+pair0=$L4,pairhead/pair0"
  --combo "len8+pair0=$L4,$X4,pairhead/pair0" --combo "pairb4=$P4" --combo "len4+pairb4=$L4,$P4")
.venv/bin/python -m research.validation "$DATA" --cache "$RUNS/cache" "${args[@]}" \
  --out "$RUNS/validation-diversity.json" &
.venv/bin/python -m research.validation "$RUNS/sim011-300" --cache "$RUNS/cache300" "${args[@]}" \
  --out "$RUNS/validation-diversity-300-frames.json"
wait

# Subject 012, simulated like 011, for both rules (never trained, selected or stopped on)
$T simulate "$RUNS/sim012" --layout train --subjects 12 --frames 120-240 --no-landmarks
$T simulate "$RUNS/sim012" --layout train --subjects 12 --frames 200-300 --protocol 2025 --no-landmarks
$T simulate "$RUNS/sim012-300" --layout train --subjects 12 --frames 300 --no-landmarks
$T simulate "$RUNS/sim012-300" --layout train --subjects 12 --frames 300 --protocol 2025 --no-landmarks
v012=(--weights weights "$RUNS/ens/pairs" --subjects 012 --top --combo "len4-shipped=$L4"
  --combo "len4+pairb4=$L4,$P4")
.venv/bin/python -m research.validation "$RUNS/sim012" --cache "$RUNS/cache012" "${v012[@]}" \
  --out "$RUNS/validation-012.json" &
.venv/bin/python -m research.validation "$RUNS/sim012-300" --cache "$RUNS/cache012-300" "${v012[@]}" \
  --out "$RUNS/validation-012-300-frames.json"
wait

# The shipped 4 retrained with one change each (a lever of the README's Levers table; the
# same seeds, left-out subjects and data as train-shipped.sh), their error heads fitted,
# then scored on 011 and 012, at their own lengths and at 300 frames, under the rule
# committed before the runs (research/validation-NAME-rule.md): RUNS/validation-NAME*.json.
variant() {  # name config cache-frame-steps [train arguments...]
  local v=$1 config=$2 steps=$3
  shift 3
  local extra=("$@")
  member() {  # member seed validation-subjects
    $T train "$DATA" --out "$RUNS/$v/$1" --config "$config" --name "$1" --seed "$2" \
      --weights "$RUNS/$v/weights" --val-subjects "$3" --cache "$RUNS/cache" --threads 1 \
      --workers 1 --resume "${extra[@]}" >> "$RUNS/$v-$1.log" 2>&1
  }
  (member len6 6 011,000,001; member len2 2 011,004,005) &
  member len5 5 011,002,003
  member len3 3 011,006,007
  wait
  $T error-head "$RUNS/$v/weights" "$DATA" --cache "$RUNS/cache" --threads 1 >> "$RUNS/error-head.log" 2>&1
  score() {  # data cache subject suffix
    .venv/bin/python -m research.validation "$1" --cache "$2" --subjects "$3" \
      --weights "$RUNS/$v/weights" --steps "$steps" --top --out "$RUNS/validation-$v$4.json"
  }
  # 2 chains of about equal length: a 300-frame run and an own-length one each
  (score "$RUNS/sim011-300" "$RUNS/cache300" 011 -300-frames
   score "$RUNS/sim012" "$RUNS/cache012" 012 -012) &
  score "$RUNS/sim012-300" "$RUNS/cache012-300" 012 -012-300-frames
  score "$DATA" "$RUNS/cache" 011 ""
  wait
}
# A 4,500-step schedule (research/validation-long-rule.md).
variant long configs/member.json 1,2 --steps 4500
# Multi-step decorrelation (research/validation-multistep-rule.md): maps of frame steps
# 1 and 2, so the cache holds frame steps 1, 2 and 4, and the validation reads them.
variant multistep configs/member-multistep.json 1,2,4
# A clip-length curriculum (research/validation-curriculum-rule.md): clips of 8, then
# 16, then 24 frames.
variant curriculum configs/member-curriculum.json 1,2
