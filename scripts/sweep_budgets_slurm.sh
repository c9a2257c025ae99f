#!/usr/bin/env bash
# Evaluate one checkpoint at several sampling compute budgets on SLURM: one job per budget, submitted
# together as a job array by Hydra's submitit launcher (conf/cluster/slurm.yaml).
#
#   CHECKPOINT=outputs/dit_xl_flex/multiruns/run1/0/checkpoints/final.ckpt scripts/sweep_budgets_slurm.sh \
#       [extra overrides of the evaluate app, e.g. eval.cfg_scale=4.0]
#
# Run it on a login node inside tmux/screen: the launcher waits for all jobs, and a dropped SSH session
# would take the waiting launcher down (jobs already submitted keep going). Each job writes its eval card
# into outputs/evaluate/multiruns/<timestamp>/<job number>/, and all of them add a row to results.csv /
# results.md and fid_vs_compute.png in that sweep directory.
#
# Each job gets one GPU: the evaluate app splits samples over torchrun ranks, and the budgets already run
# in parallel as separate jobs.
#
# Knobs (environment variables; defaults in brackets):
#   CHECKPOINT    the checkpoint to evaluate (required): a flexdit_train checkpoint or exported weights
#   BUDGETS       comma-separated budget configs from conf/budget/, one job each
#                 [static,paper_130_130,paper_70_70,paper_30_0]
#   EVAL          evaluation protocol from conf/eval/: fid10k, adm_fid50k (the paper's FID-50K), mnist [fid10k]
#   CPUS          CPU cores per job (image decoding, feature extraction) [8]
#   MEM_GB        memory per node in GB (empty: the partition's default)
#   PARTITION     SLURM partition (empty: the cluster's default)
#   ACCOUNT       SLURM account (empty: your default)
#   TIME_MIN      time limit per job in minutes; a 50k-sample DDPM-250 run of DiT-XL/2 needs many hours [720]
#   PARALLEL      budgets evaluated at once (the job array's %N) [4]
#   PYTHON        the Python interpreter that has flexdit_train installed [python]
#   TORCH_HOME    exported into the jobs: where the FID Inception weights are looked up. Compute nodes are
#                 usually offline, so put weights-inception-2015-12-05-6726825d.pth into
#                 $TORCH_HOME/hub/checkpoints/ from a login node first (or pass eval.inception_weights=PATH)
set -euo pipefail

: "${CHECKPOINT:?set CHECKPOINT to the checkpoint to evaluate}"
BUDGETS=${BUDGETS:-static,paper_130_130,paper_70_70,paper_30_0}
EVAL=${EVAL:-fid10k}
CPUS=${CPUS:-8}
TIME_MIN=${TIME_MIN:-720}
PARALLEL=${PARALLEL:-4}
PYTHON=$(command -v "${PYTHON:-python}")

overrides=(
  cluster=slurm
  cluster.nodes=1
  cluster.gpus_per_node=1
  "cluster.cpus_per_task=${CPUS}"
  "cluster.time_min=${TIME_MIN}"
  "cluster.array_parallelism=${PARALLEL}"
  "eval=${EVAL}"
  "budget=${BUDGETS}"
  "checkpoint=$(realpath "${CHECKPOINT}")"
)
[[ -n "${MEM_GB:-}" ]] && overrides+=("cluster.mem_gb=${MEM_GB}")
[[ -n "${PARTITION:-}" ]] && overrides+=("cluster.partition=${PARTITION}")
[[ -n "${ACCOUNT:-}" ]] && overrides+=("cluster.account=${ACCOUNT}")
overrides+=("$@")

exec "${PYTHON}" -m flexdit_train.evaluate -m "${overrides[@]}"
