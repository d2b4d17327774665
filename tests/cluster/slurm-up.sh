#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine for the `slurm` tests (idempotent).
#
#   sudo bash tests/cluster/slurm-up.sh      # installs Debian's slurm/munge packages if missing
#
# Needs root and Debian's package archive. Running it again while the cluster is up does nothing.
# Settings that matter: no cgroups (proctrack/linuxproc, task/none), a default memory per CPU so jobs
# share the node, batch_sched_delay=0 (else every sbatch waits 3 s), accounting through slurmdbd so
# `sacct` works. Stop it with tests/cluster/slurm-down.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install_packages() {
  local wanted=(munge slurmctld slurmd slurm-client) missing=() pkg
  [[ $ACCOUNTING == 1 ]] && wanted+=(slurmdbd mariadb-server)
  for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
  local host topology memory_mb candidate
  host=$(hostname -s)
  # the node's real topology as slurmd sees it (CPUs=.. Boards=.. ... ThreadsPerCore=..)
  topology=$(slurmd -C | head -n1 | grep -o 'CPUs=.*ThreadsPerCore=[0-9]*')
  # RealMemory above what slurmd measures drains the node, so leave 1 GiB of slack
  memory_mb=$(($(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  candidate=$(mktemp)
  {
    echo "# written by genattr tests/cluster/slurm-up.sh"
    echo "ClusterName=genattr"
    echo "SlurmctldHost=${host}(127.0.0.1)"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "MpiDefault=none"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    if [[ $ACCOUNTING == 1 ]]; then
      echo "AccountingStorageType=accounting_storage/slurmdbd"
      echo "AccountingStorageHost=localhost"
      echo "AccountingStoragePort=6819"
    else
      echo "AccountingStorageType=accounting_storage/none"
    fi
    echo "JobCompType=jobcomp/none"
    echo "MailProg=/bin/true"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=batch_sched_delay=0"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core_Memory"
    echo "DefMemPerCPU=512"
    echo "ReturnToService=2"
    echo "StateSaveLocation=/var/spool/slurmctld"
    echo "SlurmdSpoolDir=/var/spool/slurmd"
    echo "SlurmctldPidFile=/run/slurmctld.pid"
    echo "SlurmdPidFile=/run/slurmd.pid"
    echo "SlurmctldLogFile=/var/log/slurm/slurmctld.log"
    echo "SlurmdLogFile=/var/log/slurm/slurmd.log"
    echo "SlurmctldPort=6817"
    echo "SlurmdPort=6818"
    echo "NodeName=${host} NodeAddr=127.0.0.1 ${topology} RealMemory=${memory_mb} State=UNKNOWN"
    echo "PartitionName=${PARTITION} Nodes=${host} Default=YES MaxTime=INFINITE State=UP"
  } >"$candidate"
  CONFIG_CHANGED=0
  if ! cmp -s "$candidate" "$SLURM_CONF"; then
    install -m 0644 "$candidate" "$SLURM_CONF"
    CONFIG_CHANGED=1
    say "wrote $SLURM_CONF"
  fi
  if [[ $ACCOUNTING == 1 ]]; then
    {
      echo "# written by genattr tests/cluster/slurm-up.sh"
      echo "AuthType=auth/munge"
      echo "DbdHost=localhost"
      echo "DbdAddr=127.0.0.1"
      echo "DbdPort=6819"
      echo "SlurmUser=root"
      echo "StorageType=accounting_storage/mysql"
      echo "StorageHost=localhost"
      echo "StorageUser=root"
      echo "StorageLoc=genattr_slurm_acct"
      echo "LogFile=/var/log/slurm/slurmdbd.log"
      echo "PidFile=/run/slurmdbd.pid"
    } >"$candidate"
    # slurmdbd refuses a config that others can read
    cmp -s "$candidate" "$SLURMDBD_CONF" || install -m 0600 "$candidate" "$SLURMDBD_CONF"
  fi
  rm -f "$candidate"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [[ -s /etc/munge/munge.key ]] || mungekey -c -f -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge   # no systemd-tmpfiles here to create it
  runuser -u munge -- /usr/sbin/munged
  poll 10 "the munge socket" test -S /run/munge/munge.socket.2
  remember munged /run/munge/munged.pid
}

start_mariadb() {
  if mariadb-admin --socket="$MARIADB_SOCKET" ping >/dev/null 2>&1; then return 0; fi
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  install -d -o mysql -g adm -m 2750 /var/log/mysql
  [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket="$MARIADB_SOCKET" \
    --pid-file=/run/mysqld/mysqld.pid --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1 &
  poll 60 "MariaDB" mariadb-admin --socket="$MARIADB_SOCKET" ping
  poll 10 "the MariaDB pid file" test -s /run/mysqld/mysqld.pid
  remember mariadbd /run/mysqld/mysqld.pid
}

start_slurmdbd() {
  if ours slurmdbd || sacctmgr -n list cluster >/dev/null 2>&1; then return 0; fi
  slurmdbd
  poll 60 "slurmdbd" sacctmgr -n list cluster
  remember slurmdbd /run/slurmdbd.pid
}

controller_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }

start_slurmctld() {
  if controller_up; then
    ((CONFIG_CHANGED == 0)) && return 0
    if ! ours slurmctld; then
      scontrol reconfigure   # somebody else's controller: only ask it to re-read the file
      return 0
    fi
    say "configuration changed: restarting slurmctld and slurmd"   # e.g. the accounting plugin
    stop_ours slurmd slurmctld
  fi
  slurmctld
  poll 60 "slurmctld" controller_up
  remember slurmctld /run/slurmctld.pid
}

node_ready() { sinfo -h -n "$(hostname -s)" -o %T | grep -qE '^(idle|mixed|allocated)'; }

start_slurmd() {
  if ! ours slurmd && ! node_ready; then
    slurmd
    poll 10 "the slurmd pid file" test -s /run/slurmd.pid
    remember slurmd /run/slurmd.pid
  fi
  poll 60 "node $(hostname -s) to become idle" node_ready
}

main() {
  if [[ $(id -u) != 0 ]]; then
    say "must run as root (it installs packages and starts daemons)"
    exit 1
  fi
  local started=$SECONDS
  install_packages
  write_config
  start_munge
  if [[ $ACCOUNTING == 1 ]]; then
    start_mariadb
    start_slurmdbd
  fi
  start_slurmctld
  start_slurmd
  say "ready in $((SECONDS - started)) s: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ' ')"
}

main "$@"
