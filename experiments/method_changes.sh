#!/usr/bin/env bash
# "What each method change did" (README): train the demo model three ways, then sample and score each with
# jointdit.evaluate (joint task: sync score; v2a: event F1 of the generated audio) under several guidances.
#   bash experiments/method_changes.sh [ROOT]        (ROOT: where runs go; default /tmp/method_changes)
# Runs:  A = before (iso_prob 0, no timestep shift)   B = + iso training (0.2)   C = + timestep shift (sd3)
set -euo pipefail
ROOT=${1:-/tmp/method_changes}
PY=${PYTHON:-python}
export JOINTDIT_ROOT=$ROOT OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
DATA="data.size=32 data.num_clips=48"
COMMON_TRAIN="experiment=demo logger=none sample_every=-1"
train() {  # name, overrides...
  local name=$1; shift
  [ -f "$ROOT/runs/$name/export/last/jointdit.json" ] || \
    $PY -m jointdit.train $COMMON_TRAIN "$@" hydra.run.dir=$ROOT/runs/$name
}
evaluate() {  # run, label, guidance overrides...
  local run=$1 label=$2; shift 2
  [ -f "$ROOT/eval/$run-$label/evaluate.json" ] || \
    $PY -m jointdit.evaluate checkpoint=$ROOT/runs/$run/export/last $DATA "sampling.tasks=[joint,v2a]" \
      sampling.num_clips=${NUM_CLIPS:-8} sampling.steps=${STEPS:-20} sampling.shift_video=null sampling.shift_audio=null \
      distances=false plots=0 "$@" out_dir=$ROOT/eval/$run-$label hydra.run.dir=$ROOT/eval/$run-$label
}
train A objective.iso_prob=0 objective.timestep_shift.method=none &
train B objective.iso_prob=0.2 objective.timestep_shift.method=none &
train C objective.iso_prob=0.2 &
wait
evaluate A none guidance=none
evaluate A cfg guidance=cfg
evaluate A jointcfg guidance=jointcfg guidance.allow_untrained_iso=true
evaluate B none guidance=none
evaluate B jointcfg guidance=jointcfg
evaluate C none guidance=none
evaluate C jointcfg guidance=jointcfg
$PY experiments/method_changes_table.py "$ROOT"
