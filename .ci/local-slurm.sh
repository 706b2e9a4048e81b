#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian's slurm-wlm + munge), so tests/test_slurm.py
# can run launch/slurm.sbatch as a cluster does: sbatch, srun, --time, --signal, requeue.
#   .ci/local-slurm.sh         # root: installs with apt if absent, writes slurm.conf, starts munged,
#                              # slurmctld and slurmd; a cluster already up with this config is left as is
#   .ci/local-slurm.sh stop    # stops the three daemons
# The node is this machine as `slurmd -C` sees it (its CPUs, sockets, cores, memory; no GPUs), with
# tasks bound to their CPUs as on real clusters (task/affinity). For a quick test cycle: a requeued
# job waits AuthInfo's cred_expire before it may start again (10 s, not 120), and the scheduler
# looks at pending jobs every 5 s (not 60).
set -euo pipefail
CONF=/etc/slurm/slurm.conf

stop() {  # stop PIDFILE...: each daemon in turn
  for pidfile in "$@"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true  # slurmd may take a minute to shut down: a test cluster need not wait
  done
}

running() {  # the daemon of this pid file is alive
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmd slurmctld slurm-client munge >/dev/null
}

start_munge() {
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1024 count=1 of=/etc/munge/munge.key 2>/dev/null
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  running /run/munge/munged.pid || su -s /bin/sh munge -c /usr/sbin/munged
}

CONF_CHANGED=0
write_conf() {  # sets CONF_CHANGED=1 when the file is new or different
  local node new
  node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ...
  new=$(cat <<CONF
ClusterName=local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$(hostname -s) Default=YES MaxTime=INFINITE State=UP
CONF
)
  mkdir -p /etc/slurm /var/spool/slurmd /var/spool/slurmctld /var/log/slurm
  if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new" ]; then
    printf '%s\n' "$new" > "$CONF"
    CONF_CHANGED=1
  fi
}

controller_up() { scontrol ping 2>/dev/null | grep -q UP; }

wait_for() {  # wait_for SECONDS COMMAND...: true once COMMAND succeeds
  local end=$((SECONDS + $1)); shift
  until "$@"; do [ "$SECONDS" -lt "$end" ] || return 1; sleep 0.5; done
}

node_ready() {
  case "$(sinfo -h -n "$(hostname -s)" -o %t 2>/dev/null)" in
    idle|mix|alloc|comp) return 0 ;;
    down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
  esac
  return 1
}

if [ "${1:-}" = stop ]; then stop /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "error: $0 must run as root (it installs packages and starts daemons)" >&2; exit 1; }
install
start_munge
write_conf
# The daemons read slurm.conf when they start: a new one restarts them.
[ "$CONF_CHANGED" = 0 ] || stop /run/slurmd.pid /run/slurmctld.pid
running /run/slurmctld.pid || slurmctld
wait_for 20 controller_up || { echo "error: slurmctld did not start: see /var/log/slurm/slurmctld.log" >&2; exit 1; }
running /run/slurmd.pid || slurmd
wait_for 30 node_ready || { echo "error: node $(hostname -s) not ready: see /var/log/slurm/slurmd.log" >&2; exit 1; }
sinfo -N -o '%N %t %c %m'
