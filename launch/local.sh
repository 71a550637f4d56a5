#!/usr/bin/env bash
# Run the main job on this machine (CPU, one GPU, or all local GPUs/TPU chips).
#
#   launch/local.sh CONFIG WORKDIR [extra flags...]
#   launch/local.sh configs/digits.py runs/digits
#   launch/local.sh configs/emigm_xs_256.py runs/xs --config.data.path=/data/latents
#
# Every local accelerator joins one mesh (config.mesh.data x config.mesh.fsdp = device
# count; -1 fills in). Re-running the same command resumes from the newest checkpoint in
# WORKDIR. Environment knobs:
#   FAKE_DEVICES=N   split the CPU into N XLA devices (exercise sharding without hardware)
#   PLATFORM=cpu     force a backend (cpu | cuda | tpu); default: whatever jax finds
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
  export JAX_PLATFORMS=cpu
fi
if [[ -n "${PLATFORM:-}" ]]; then
  export JAX_PLATFORMS="${PLATFORM}"
fi

cd "$HERE"
exec "$PYTHON" -m emigm_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
