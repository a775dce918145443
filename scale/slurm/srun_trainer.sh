#!/bin/bash
# The body of the sbatch templates: start one trainer task per allocated slot with srun.
#   srun_trainer.sh run_pretrain.py|run_finetune.py [trainer arguments...]
set -euo pipefail
cd "$SLURM_SUBMIT_DIR"
trainer="$1"; shift
if [ ! -f "$trainer" ]; then
    echo "error: $trainer not found in $SLURM_SUBMIT_DIR: submit from the repository root" >&2
    exit 2
fi
gpus="${SLURM_GPUS_PER_NODE:-0}"; gpus="${gpus##*:}"  # "4" or "a100:4"
tasks="${SLURM_TASKS_PER_NODE%%[(,]*}"  # "8(x4)" -> 8
if [ "$gpus" != 0 ] && [ "$gpus" != "$tasks" ]; then
    echo "error: --gpus-per-node=$gpus but --ntasks-per-node=$tasks: give both the same number (one task per GPU)" >&2
    exit 2
fi
echo "job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)): ${SLURM_NTASKS:-$SLURM_JOB_NUM_NODES} task(s) on $SLURM_JOB_NODELIST, $(date -Is)"
# srun (22.05+) no longer takes --cpus-per-task from the job: pass it, or each task gets one core.
# A rank that dies ends the step at once instead of leaving the others in a collective until timeout.
# resume=auto first, so that a resume= in the arguments still wins.
exec srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    "${PYTHON:-python}" "$trainer" resume=auto "$@"
