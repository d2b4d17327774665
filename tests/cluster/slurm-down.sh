#!/usr/bin/env bash
# Stop the test cluster started by slurm-up.sh: cancel its jobs, then stop only the daemons it started.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

queue_empty() { [[ -z $(squeue -h 2>/dev/null) ]]; }

if ours slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    # shellcheck disable=SC2086
    scancel $jobs || true
    poll 30 "cancelled jobs to leave the queue" queue_empty || true
  fi
fi
stop_ours slurmd slurmctld
stop_ours slurmdbd mariadbd munged
rmdir "$GENATTR_SLURM_STATE" 2>/dev/null || true
say "stopped"
