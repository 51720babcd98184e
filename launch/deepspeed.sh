#!/usr/bin/env bash
# The same trainer through DeepSpeed's own launcher (one node; add --hostfile / --no_ssh for several):
#   NPROC=2 CONFIG=launch/configs/pretrain_debug.yaml launch/deepspeed.sh --train.run_dir runs/ds
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:?set CONFIG=launch/configs/<stage>.yaml}
NPROC=${NPROC:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # torchrun sets this per rank; deepspeed's launcher does not
exec "$(dirname "$PY")/deepspeed" --num_gpus "$NPROC" ${DS_LAUNCH_ARGS:-} --module alpro.train --config "$CONFIG" "$@"
