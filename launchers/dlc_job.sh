#!/bin/bash
# PAI-DLC: a PyTorchJob of NODES nodes runs the same entrypoint on every node. DLC sets
# MASTER_ADDR, MASTER_PORT, WORLD_SIZE (nodes), RANK (node rank) and
# KUBERNETES_CONTAINER_RESOURCE_GPU; launcher=dlc reads them, applies the NCCL settings of
# conf/launcher/dlc.yaml and starts the node's workers (one per GPU).
#
#   IMAGE=<registry>/<training image> RESOURCE_ID=<quota id> \
#     bash launchers/dlc_job.sh model=llama3_8b parallel=tp4pp2 precision=bf16 ...
#
# It submits with PAI's command-line tool (`pai dlc job submit`); in the console, paste the
# printed node command as the job's start command instead. CODE_DIR (this repository) and
# OUTPUT (checkpoints, TensorBoard, summary; the same folder for every node) must be on storage
# that every node mounts (NAS/CPFS/OSS dataset of the workspace). Submitting the same command
# again resumes from the latest checkpoint in OUTPUT.
set -euo pipefail

NAME=${NAME:-llmtrain}
IMAGE=${IMAGE:?set IMAGE to a training image with llmtrain installed (pip install -e ".[gpu]")}
NODES=${NODES:-2}
GPUS=${GPUS:-8}
CODE_DIR=${CODE_DIR:-/mnt/data/llmtrain}
OUTPUT=${OUTPUT:-/mnt/data/outputs/$NAME}

printf -v OVERRIDES ' %q' "$@"
NODE_COMMAND="cd $CODE_DIR && python -m llmtrain launcher=dlc hydra.run.dir=$OUTPUT$OVERRIDES"
echo "node command: $NODE_COMMAND"

pai dlc job submit --name "$NAME" --job-type PyTorchJob --image "$IMAGE" \
  --worker-count "$NODES" --gpu "$GPUS" ${RESOURCE_ID:+--resource-id "$RESOURCE_ID"} \
  --command "$NODE_COMMAND"
