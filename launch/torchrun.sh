#!/usr/bin/env bash
# Single-node launcher for megatron_ext.train (CPU/gloo or GPU/NCCL: the trainer picks the backend).
#   CONFIG=launch/configs/tiny_cpu_pretrain.yaml NPROC=4 launch/torchrun.sh [--set key=value ...]
# Environment: CONFIG (required), NPROC (default: GPUs, else 2), MASTER_PORT (default: a free port),
# LOG_RANK (show only this rank's output; default: all), PYTHON (default: .venv/bin/python or python3),
# MODULE (default: megatron_ext.train). Extra arguments go to the trainer. Exits with torchrun's status.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
: "${CONFIG:?set CONFIG to a launch/configs/*.yaml file}"
PYTHON=${PYTHON:-$( [ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3 )}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
MODULE=${MODULE:-megatron_ext.train}
filter=()
[ -n "${LOG_RANK:-}" ] && filter=(--local-ranks-filter "$LOG_RANK")
export PYTHONFAULTHANDLER=1
# megatron-core (TP/SP comm overlap ordering) expects one hardware work queue per GPU; as render sets it
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
set +e
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" --master-port "$MASTER_PORT" "${filter[@]}" \
  -m "$MODULE" --config "$CONFIG" "$@"
status=$?
exit $status
