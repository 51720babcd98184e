#!/usr/bin/env bash
# Launch `alpro train` with torchrun on one node or many. Everything is an environment override:
#
#   NPROC=8 CONFIG=launch/configs/pretrain_webvid_cc3m.yaml launch/torchrun.sh --train.run_dir runs/pt
#   # two nodes (run on each; NODE_RANK differs):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 CONFIG=... launch/torchrun.sh
#
# Extra arguments are passed to the trainer as config overrides. Logs come from rank 0 unless LOG_RANKS is set
# (e.g. LOG_RANKS=0,1), as torchrun's --local-ranks-filter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:?set CONFIG=launch/configs/<stage>.yaml}
NPROC=${NPROC:-$($PY -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
LOG_RANKS=${LOG_RANKS:-0}
RDZV=${RDZV:-c10d}   # c10d (elastic rendezvous) or static (--master_addr/--node_rank)

if [ "$NNODES" = 1 ] && [ -z "${FORCE_RDZV:-}" ]; then
  DIST=(--standalone)
elif [ "$RDZV" = static ]; then
  DIST=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  DIST=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
        --rdzv_id "${RDZV_ID:-alpro}")
fi
exec "$PY" -m torch.distributed.run "${DIST[@]}" --nproc_per_node "$NPROC" \
  --local-ranks-filter "$LOG_RANKS" --tee 3 \
  -m alpro.train --config "$CONFIG" "$@"
