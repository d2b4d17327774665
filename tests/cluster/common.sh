# Shared helpers of slurm-up.sh / slurm-down.sh (sourced, not run).
#
# The test cluster is one node named after this host, run without systemd or cgroups:
# every daemon is started by hand and remembered in $GENATTR_SLURM_STATE/<daemon>.pid,
# so slurm-down.sh stops exactly what slurm-up.sh started and nothing else.
set -euo pipefail

GENATTR_SLURM_STATE=${GENATTR_SLURM_STATE:-/run/genattr-slurm}
SLURM_CONF=/etc/slurm/slurm.conf
SLURMDBD_CONF=/etc/slurm/slurmdbd.conf
MARIADB_SOCKET=/run/mysqld/mysqld.sock
# 1 = slurmdbd + MariaDB so that `sacct` works: submitit polls it to notice a job that died without
# writing its result file (scancel, hard time limit); 0 = no accounting (faster cold start).
ACCOUNTING=${GENATTR_SLURM_ACCOUNTING:-1}
PARTITION=${GENATTR_SLURM_PARTITION:-debug}

say() { echo "[genattr-slurm] $*" >&2; }

# poll SECONDS DESCRIPTION CMD...: retry CMD every 0.2 s until it succeeds or time runs out.
poll() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  while ! "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      say "gave up after ${limit}s waiting for ${what}"
      return 1
    fi
    sleep 0.2
  done
}

# ours NAME: true when we started NAME and that process is still alive (pid file + /proc/<pid>/comm).
ours() {
  local file=$GENATTR_SLURM_STATE/$1.pid pid
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ -r /proc/$pid/comm && $(</proc/$pid/comm) == "$1" ]]
}

# remember NAME PIDFILE: record that this script started NAME.
remember() {
  mkdir -p "$GENATTR_SLURM_STATE"
  cp "$2" "$GENATTR_SLURM_STATE/$1.pid"
}

# stop_ours NAME...: SIGTERM the named daemons we started, all at once, and wait up to 30 s for them.
stop_ours() {
  local name pids=() pid
  for name in "$@"; do
    if ours "$name"; then
      pid=$(<"$GENATTR_SLURM_STATE/$name.pid")
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$GENATTR_SLURM_STATE/$name.pid"
  done
  local deadline=$((SECONDS + 30))
  for pid in "${pids[@]}"; do
    while [[ -d /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.2; done
    [[ -d /proc/$pid ]] && say "pid $pid still alive after 30 s"
  done
  return 0
}
