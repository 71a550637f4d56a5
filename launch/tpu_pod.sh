#!/usr/bin/env bash
# Run the main job on every worker of a Cloud TPU VM pod slice, with one command.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags...]
#   launch/tpu_pod.sh my-v5e-64 us-west4-a configs/emigm_b_256.py gs://bucket/runs/b256 \
#       --config.data.path=gs://bucket/latents/imagenet256 --config.mesh.fsdp=4
#
# What it does: copies nothing and installs nothing by default; it runs the same
# `python -m emigm_jax.main` on all workers (gcloud ... ssh --worker=all). On a TPU pod,
# jax.distributed.initialize() auto-detects the coordinator, process count and ids, so no
# coordinator flags are needed. WORKDIR must be storage every worker sees (a gs:// bucket
# or a shared filesystem): Orbax writes each process's shards of the checkpoint there.
# Preemption (spot/preemptible slices): the JAX coordination service turns the maintenance
# SIGTERM into a common step on all workers; the job checkpoints there and exits 0; rerun
# this command to resume.
#
# Environment knobs:
#   REPO_DIR   where the repository lives on the workers (default: ~/emigm-jax)
#   SETUP=1    first `git pull` / `pip install -e .` on every worker (REPO_URL to clone)
#   PROJECT    gcloud project (default: the active one)
#   PYTHON     interpreter on the workers (default: python3)
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,22p' "$0" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
WORKDIR=$4
shift 4

REPO_DIR="${REPO_DIR:-~/emigm-jax}"
PYTHON="${PYTHON:-python3}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project="$PROJECT")
fi

quote() { printf '%q ' "$@"; }
EXTRA="$(quote "$@")"

SETUP_CMD=""
if [[ "${SETUP:-0}" == "1" ]]; then
  if [[ -n "${REPO_URL:-}" ]]; then
    SETUP_CMD="[ -d $REPO_DIR ] || git clone $REPO_URL $REPO_DIR; "
  fi
  # .[tpu] pins jax[tpu] to requirements.txt's jax version, which pins the matching libtpu.
  SETUP_CMD+="cd $REPO_DIR && git pull --ff-only && $PYTHON -m pip install -q -e '.[tpu]'; "
fi

RUN_CMD="cd $REPO_DIR && $PYTHON -m emigm_jax.main --config=$(quote "$CONFIG")"
RUN_CMD+=" --workdir=$(quote "$WORKDIR") $EXTRA"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} \
  --worker=all --command="${SETUP_CMD}${RUN_CMD}"
