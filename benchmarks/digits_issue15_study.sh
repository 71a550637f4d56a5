#!/usr/bin/env bash
# Issue 15 studies on the discrete digits (benchmarks/RESULTS.md): MaskGIL's AR prefix,
# BAG's momentum solver, guided masked-Z scoring, DI's conditional coupling and DI trend 5.
#
# Trains digits_ar (the AR model), digits_maskgil, digits_di and digits_di with conditional
# coupling 0.25 through the main job, then
#   * the AR-share table: --mode=sample of digits_maskgil with sample.ar_prefix in
#     {0, 0.25, 0.5, 0.75, 1} (AR weights from the digits_ar run), metrics kept per share;
#   * sweeps with sample presets (configs/digits_discrete.py) for the solver, z_cfg and the
#     confidence-sampling temperature.
# Usage: benchmarks/digits_issue15_study.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs}
PY=${PYTHON:-python}

train() {  # train NAME CONFIG [overrides...]: the main job, skipped when already scored
  local name=$1 config=$2; shift 2
  if [[ ! -f "$RUNS/$name/metrics.json" ]]; then
    "$PY" -m emigm_jax.main --config="configs/$config.py" --workdir="$RUNS/$name" \
      --config.train.progress=False "$@"
  fi
}

study() {  # study NAME CONFIG OUT_DIR PRESETS ITERS [CFG_SCALES] [overrides...]
  local name=$1 config=$2 out=$3 presets=$4 iters=$5 cfgs=${6:-"(1.0,)"}; shift 6 || shift $#
  "$PY" -m emigm_jax.main --mode=sweep --config="configs/$config.py" --workdir="$RUNS/$name" \
    --config.sweep.out_dir="$out" --config.sweep.presets="$presets" \
    --config.sweep.num_iters="$iters" --config.sweep.cfg_scales="$cfgs" "$@"
}

train digits_ar digits_ar
train digits_maskgil digits_maskgil
train digits_di digits_di
train digits_di_coupling digits_di --config.mask.coupling_ratio=0.25 --config.name=digits_di_coupling

# DI trend 5: confidence-sampling temperature on the DI network
study digits_di digits_di study_confidence_temperature \
  '("confidence_temp08","confidence","confidence_temp12")' '(8,16)'

# MaskGIL Table 5 on digits: AR share x 64 AR steps + the masked model's 8 steps
for share in 0.0 0.25 0.5 0.75 1.0; do
  out="$RUNS/digits_maskgil/ar_prefix_$share.json"
  if [[ ! -f "$out" ]]; then
    "$PY" -m emigm_jax.main --mode=sample --config=configs/digits_maskgil.py \
      --workdir="$RUNS/digits_maskgil" --config.sample.ar_prefix=$share \
      --config.sample.ar_workdir="$RUNS/digits_ar"
    cp "$RUNS/digits_maskgil/metrics.json" "$out"
  fi
done

# BAG: momentum solver vs vanilla; masked-Z scoring at inversion CFG 0 / 1 / 2 / 3
study digits_maskgil digits_maskgil study_solver '("default","momentum2")' '(4,8,16,32)' '(2.0,)'
study digits_maskgil digits_maskgil study_z_cfg \
  '("masked_z","masked_z_cfg1","masked_z_cfg2","masked_z_cfg3")' '(8,16)' '(2.0,)'
