#!/usr/bin/env bash
# A real single-node Slurm, with accounting, for expert-lab's Slurm tests and for trying job arrays locally.
#
#   tools/slurm.sh start    install from the Debian archive (once), configure, start, wait for an idle node
#   tools/slurm.sh status   which daemons run, and the node's state; exit 0 only when Slurm answers
#   tools/slurm.sh stop     cancel queued/running jobs, then stop every daemon this script started (by pid)
#
# Needs root on Debian 12 without systemd. Daemons: munged, mariadbd (accounting database),
# slurmdbd, slurmctld, slurmd. One node "localhost" with CPUs=8 (more than the machine's cores, so
# several array tasks run at once), RealMemory = 90% of MemTotal, one partition "debug".
# State, logs, pid files and the database live under $EXPERT_LAB_SLURM_HOME
# (default /var/lib/expert-lab-slurm); slurm.conf and slurmdbd.conf are written to /etc/slurm,
# where sinfo/sbatch/sacct look for them, and the script refuses to overwrite files it did not write.
set -euo pipefail

H=${EXPERT_LAB_SLURM_HOME:-/var/lib/expert-lab-slurm}
CONF=/etc/slurm
DB_PORT=${EXPERT_LAB_SLURM_DB_PORT:-3307}   # not 3306, so a site MariaDB can keep its port
MARK="# Written by expert-lab tools/slurm.sh; rewritten on every start."
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
# Start order; stop goes backwards. Each name is also the daemon's /proc/PID/comm.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

say() { printf 'slurm.sh: %s\n' "$*"; }
die() { printf 'slurm.sh: error: %s\n' "$*" >&2; exit 1; }

# A pid counts as ours only if it is alive and still runs the daemon we started (pids get reused).
alive() {  # NAME [PID]
  local pid=${2:-$(cat "$H/run/$1.pid" 2>/dev/null)}
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

wait_for() {  # SECONDS WHAT COMMAND...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "$what did not come up within ${secs}s (logs: $H/log/)"
    sleep 0.2
  done
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing ${missing[*]} from the Debian archive"
  # Without a policy-rc.d, package scripts may start the Debian services (a second mariadbd, ...):
  # block that for this install only; the daemons are started below, under our own paths.
  local policy=/usr/sbin/policy-rc.d added=0
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' >$policy; chmod 755 $policy; added=1; fi
  local apt=(apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${missing[@]}")
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null ||
    { apt-get -o DPkg::Lock::Timeout=300 update >/dev/null && DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null; } ||
    { [ $added = 1 ] && rm -f $policy; die "apt-get install ${missing[*]} failed"; }
  [ $added = 1 ] && rm -f $policy
  return 0
}

# Write FILE from stdin unless a file there was not written by this script.
write_owned() {  # FILE MODE
  if [ -e "$1" ] && [ "$(head -n1 "$1")" != "$MARK" ]; then
    die "$1 exists and was not written by this script; move it away to use tools/slurm.sh"
  fi
  { echo "$MARK"; cat; } >"$1.new"
  chmod "$2" "$1.new"
  if [ -e "$1" ] && ! cmp -s "$1" "$1.new" && alive slurmctld; then
    say "warning: $1 changed while Slurm runs; run 'tools/slurm.sh stop' then 'start' to apply it"
  fi
  mv "$1.new" "$1"
}

write_config() {
  mkdir -p "$H"/{state,spool,log,run} "$CONF"
  local mem_mb db_pass
  mem_mb=$(awk '/^MemTotal:/ {print int($2 * 0.9 / 1024)}' /proc/meminfo)
  [ -s "$H/db-password" ] || { (umask 077; od -An -N12 -tx1 /dev/urandom | tr -d ' \n' >"$H/db-password"); }
  db_pass=$(cat "$H/db-password")
  write_owned "$CONF/slurm.conf" 644 <<EOF
ClusterName=expertlab
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Credentials expire after 5 s instead of 120 s: a requeued job may restart after that long.
AuthInfo=cred_expire=5
CredType=cred/munge
StateSaveLocation=$H/state
SlurmdSpoolDir=$H/spool
SlurmctldPidFile=$H/run/slurmctld.pid
SlurmdPidFile=$H/run/slurmd.pid
SlurmctldLogFile=$H/log/slurmctld.log
SlurmdLogFile=$H/log/slurmd.log
# No systemd and no cgroups on these machines.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# CPUs=8 beyond the real cores (config_overrides): several array tasks share the machine at once.
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  write_owned "$CONF/slurmdbd.conf" 600 <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$H/run/slurmdbd.pid
LogFile=$H/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
}

# Remember a daemon's pid in our run folder: stop kills only what is listed there.
record_pid() {  # NAME PIDFILE_WRITTEN_BY_DAEMON
  cp "$2" "$H/run/$1.pid.tmp" && mv "$H/run/$1.pid.tmp" "$H/run/$1.pid"
}

start_munged() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    alive munged || say "using the munged that is already running (not started here; stop leaves it)"
    return
  fi
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  wait_for 20 munged sh -c 'munge -n | unmunge'
  record_pid munged /run/munge/munged.pid
}

mysql_sock() { echo "$H/mysql-run/mysqld.sock"; }
sql() { mariadb --no-defaults --socket="$(mysql_sock)" -u root "$@"; }

start_mariadbd() {
  alive mariadbd && return
  mkdir -p "$H/mysql-run" && chown mysql:mysql "$H/mysql-run"
  if [ ! -d "$H/mysql/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$H/mysql" --skip-test-db \
      >"$H/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $H/log/mariadb-install.log)"
  fi
  # mariadbd stays in the foreground: setsid detaches it from this shell, and $! is its own pid.
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$H/mysql" --socket="$(mysql_sock)" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$H/mysql-run/mariadbd.pid" \
    --log-error="$H/log/mariadb.log" </dev/null >>"$H/log/mariadb.log" 2>&1 &
  echo $! >"$H/run/mariadbd.pid"
  wait_for 60 mariadbd sql -e 'select 1'
  local pw; pw=$(cat "$H/db-password")
  sql <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
  alive slurmdbd && return
  /usr/sbin/slurmdbd
  wait_for 60 slurmdbd bash -c '</dev/tcp/127.0.0.1/6819'
}

start_slurmctld() {
  alive slurmctld && return
  /usr/sbin/slurmctld
  wait_for 60 slurmctld sh -c 'scontrol ping | grep -q UP'
}

start_slurmd() {
  alive slurmd && return
  # The machine's hostname is not "localhost": -N names the node slurm.conf describes.
  /usr/sbin/slurmd -N localhost
}

node_ready() { sinfo -h -N -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

cmd_start() {
  [ "$(id -u)" = 0 ] || die "start needs root (it installs packages and starts system daemons)"
  local t0=$SECONDS
  install_packages
  write_config
  local d; for d in "${DAEMONS[@]}"; do "start_$d"; done
  wait_for 60 "the node" node_ready
  say "Slurm is up in $((SECONDS - t0))s: $(sinfo -h -N -o '%N %T %c CPUs %m MB, partition %P')"
}

cancel_jobs() {
  alive slurmctld || return 0
  local ids; ids=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  [ -n "${ids// }" ] || return 0
  say "cancelling jobs: $ids"
  # shellcheck disable=SC2086
  scancel $ids || true
  # submitit's job handler ignores SIGTERM, so a cancel takes KillWait (5 s) before SIGKILL.
  local end=$((SECONDS + 30))
  while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ $SECONDS -lt $end ]; do sleep 0.5; done
}

stop_daemon() {  # NAME
  local f="$H/run/$1.pid" pid
  pid=$(cat "$f" 2>/dev/null) || return 0
  if alive "$1" "$pid"; then
    kill "$pid" 2>/dev/null || true
    local end=$((SECONDS + 15))
    while alive "$1" "$pid" && [ $SECONDS -lt $end ]; do sleep 0.2; done
    alive "$1" "$pid" && { say "$1 ($pid) ignored SIGTERM; sending SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
    say "stopped $1 ($pid)"
  fi
  rm -f "$f"
}

cmd_stop() {
  cancel_jobs
  local i; for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
}

cmd_status() {
  local d up=0
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then say "$d running (pid $(cat "$H/run/$d.pid"))"; up=$((up + 1))
    else say "$d not running (or not started by this script)"; fi
  done
  if command -v sinfo >/dev/null && node_ready; then
    sinfo -N -o '%N %T %c %m %P'
    return 0
  fi
  say "Slurm is not answering"
  return 3
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
