#!/usr/bin/env bash
# The companion-methods trend study on the discrete digits (benchmarks/RESULTS.md, issue 10).
#
# Trains the four discrete digits models through the main job (plus two ablation models:
# digits_di with an explicit-timestep network, digits_maskgil with ViT blocks and learned
# positions), then runs the sampler studies as sweeps with sample presets
# (configs/digits_discrete.py: SAMPLE_PRESETS). Every sweep writes
# <run>/<study>/sweep.md, sweep.csv and nfe_vs_fid.png; points are cached, so a rerun only
# samples what is missing. Usage: benchmarks/digits_companion_study.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs}
PY=${PYTHON:-python}

train() {  # train NAME CONFIG [overrides...]: the main job, skipped when already scored
  local name=$1 config=$2; shift 2
  if [[ ! -f "$RUNS/$name/metrics.json" ]]; then
    /usr/bin/env time -f "$name: wall %e s" \
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

train digits_maskgit digits_maskgit
train digits_maskgil digits_maskgil
train digits_di digits_di
train digits_mdm digits_mdm

# MaskGIT model (cosine training, confidence order, count reveal, Gumbel 4.5 linear)
study digits_maskgit digits_maskgit study_schedules '("linear","cosine","arccos","pow06","root")' '(4,8,16)'
study digits_maskgit digits_maskgit study_bag '("default","noise_reg","differential","masked_z","recover_z")' '(4,8,16)'
study digits_maskgit digits_maskgit study_random_z '("default","random_z1","random_z2","random_z4","random_z8")' '(8,)'
study digits_maskgit digits_maskgit study_gumbel '("gumbel_linear","gumbel_const","no_gumbel")' '(4,8,16)'
study digits_maskgit digits_maskgit study_cfg '("default",)' '(8,)' '(1.0,1.5,2.0,3.0,4.0)'
# MaskGIL model (arccos training, CFG 2 on logits). No 64-step points anywhere: a digit has
# 64 tokens, so 64 count-reveal steps reveal one token each whatever the schedule.
study digits_maskgil digits_maskgil study_schedules '("root","linear","square","cosine","arccos")' '(4,8,16,32)' '(2.0,)'
study digits_maskgil digits_maskgil study_cfg '("default",)' '(8,)' '(1.0,1.5,2.0,2.5,3.0,4.0)'
# Discrete Interpolants model (ITM; linear training, Euler reveal, final argmax, top-p 0.9)
study digits_di digits_di study_reveal '("euler","confidence")' '(4,8,16,32)'
study digits_di digits_di study_final_argmax '("final_argmax","no_final_argmax")' '(2,4,8,16)'
study digits_di digits_di study_schedule_match '("linear","cosine")' '(4,8,16)'
study digits_di digits_di study_temperature '("temp08","default","temp12")' '(16,)'
study digits_di digits_di study_cfg '("default","confidence")' '(16,)' '(1.0,2.0,3.0,4.0)'
# Ablation models: ETM vs ITM (DI), LLaMA+RoPE vs ViT+learned positions (MaskGIL)
train digits_di_etm digits_di --config.model.time_cond=explicit --config.name=digits_di_etm
train digits_maskgil_vit digits_maskgil --config.model.block=vit --config.model.pos_emb=learned \
  --config.name=digits_maskgil_vit
study digits_maskgil_vit digits_maskgil study_cfg '("default",)' '(8,)' '(1.0,1.5,2.0,2.5,3.0,4.0)' \
  --config.model.block=vit --config.model.pos_emb=learned --config.name=digits_maskgil_vit
study digits_di_etm digits_di study_reveal '("euler","confidence")' '(4,8,16,32)' '(1.0,)' \
  --config.model.time_cond=explicit --config.name=digits_di_etm
# Sampling noise: the MaskGIT default at other sampling seeds (same weights)
for seed in 1 2; do
  study digits_maskgit digits_maskgit "study_seed$seed" '("default",)' '(4,8,16)' '(1.0,)' \
    --config.seed=$seed
done
