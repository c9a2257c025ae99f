#!/usr/bin/env bash
# Train a flexible DiT on SLURM through Hydra's submitit launcher (conf/cluster/slurm.yaml).
#
#   PARTITION=gpu NODES=2 scripts/train_slurm.sh [extra Hydra overrides...]
#
# Run it on a login node inside tmux/screen: the launcher submits the job and then waits for it, and a
# dropped SSH session would take the waiting launcher (not the job) down with it. The job requeues itself
# on preemption and at the time limit, and continues from the newest checkpoint of its run directory.
#
# Knobs (environment variables; defaults in brackets):
#   EXPERIMENT    experiment file in conf/experiment/ [dit_xl_flex]
#   NODES         nodes for the job [1]
#   GPUS          GPUs per node; also the srun tasks per node and trainer.devices [8]
#   CPUS          CPU cores per GPU task: data.num_workers loader processes + the trainer [10]
#   MEM_GB        memory per node in GB (empty: the partition's default)
#   PARTITION     SLURM partition (empty: the cluster's default)
#   ACCOUNT       SLURM account (empty: your default)
#   TIME_MIN      time limit per job in minutes; training continues across requeues [1440]
#   MAX_TIMEOUTS  how often the job may requeue after hitting the time limit [20]
#   RUN_NAME      fixed run directory outputs/<task_name>/multiruns/<RUN_NAME>/0: rerunning this script with
#                 the same RUN_NAME continues that run (resume=auto) instead of starting a new one
#                 (empty: a new timestamped directory per submission)
#   DOCTOR        1: each job first runs `python -m flexdit_train.doctor` with the same overrides on its
#                 first node and stops before srun if a check fails (wrong task layout, too few shards,
#                 unreadable checkpoint); 0: skip [1]
#   PYTHON        the Python interpreter that has flexdit_train installed [python]
#   WANDB_MODE    exported into the job; set offline on clusters whose nodes have no internet and upload
#                 later with `wandb sync outputs/<task_name>/multiruns/<run>/0/wandb/offline-run-*`
set -euo pipefail

EXPERIMENT=${EXPERIMENT:-dit_xl_flex}
NODES=${NODES:-1}
GPUS=${GPUS:-8}
CPUS=${CPUS:-10}
TIME_MIN=${TIME_MIN:-1440}
MAX_TIMEOUTS=${MAX_TIMEOUTS:-20}
DOCTOR=${DOCTOR:-1}
PYTHON=$(command -v "${PYTHON:-python}")

overrides=(
  "+experiment=${EXPERIMENT}"
  cluster=slurm
  "cluster.nodes=${NODES}"
  "cluster.gpus_per_node=${GPUS}"
  "cluster.cpus_per_task=${CPUS}"
  "cluster.time_min=${TIME_MIN}"
  "cluster.max_timeouts=${MAX_TIMEOUTS}"
)
[[ -n "${MEM_GB:-}" ]] && overrides+=("cluster.mem_gb=${MEM_GB}")
[[ -n "${PARTITION:-}" ]] && overrides+=("cluster.partition=${PARTITION}")
[[ -n "${ACCOUNT:-}" ]] && overrides+=("cluster.account=${ACCOUNT}")
# single quotes: Hydra resolves ${paths.log_dir} and ${task_name}, not the shell
[[ -n "${RUN_NAME:-}" ]] && overrides+=('hydra.sweep.dir=${paths.log_dir}/${task_name}/multiruns/'"${RUN_NAME}")
overrides+=("$@")

if [[ "${DOCTOR}" == 1 ]]; then
  # The job inherits this environment (sbatch exports it), so the setup line reads the overrides from it.
  # Overrides are split on spaces there: pass values with spaces through a config file instead.
  export FLEXDIT_DOCTOR_OVERRIDES="${overrides[*]}"
  overrides+=("cluster.setup=[\"${PYTHON} -m flexdit_train.doctor -m \$FLEXDIT_DOCTOR_OVERRIDES || exit 1\"]")
fi

exec "${PYTHON}" -m flexdit_train -m "${overrides[@]}"
