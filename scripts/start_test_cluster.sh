#!/usr/bin/env bash
# A single-node SLURM 22.05 cluster on 127.0.0.1 for tests and local trials of `sweep submit`.
#
#   scripts/start_test_cluster.sh start [CPUS]   -> prints DIR, then SLURM_CONF=DIR/slurm.conf
#   scripts/start_test_cluster.sh stop DIR
#
# Needs root and Debian's `slurm-wlm` + `munge`. No systemd and no cgroups: munged runs as the
# munge user (with /run/munge created first), slurmctld and slurmd run as root with
# proctrack/linuxproc, task/none and select/cons_tres + CR_CPU. One node `localhost` with CPUS
# CPUs (default 2; may exceed the real cores: config_overrides), RealMemory=2000 (MB) and the
# feature `sweeptest` (so --mem and --constraint are judged as on a real cluster: more memory or
# a feature no node has is refused at submission), one partition `debug`. Ports are picked free,
# so clusters of several test runs do not collide. No accounting (sacct needs slurmdbd): read
# results from job output files or `scontrol show job`; --account is recorded unchecked and
# --qos dropped (QOS=(null)). Every client needs SLURM_CONF exported.
set -euo pipefail
cmd="${1:?usage: start [CPUS] | stop DIR}"
for bin in munged slurmctld slurmd sbatch; do
  command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || { echo "$bin not found (apt-get install slurm-wlm munge)" >&2; exit 3; }
done

if [ "$cmd" = stop ]; then
  dir="${2:?stop DIR}"
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 0.5
  rm -rf "$dir"
  exit 0   # munged is shared by every cluster on this machine: left running
fi

cpus="${2:-2}"
# munge: one daemon per machine, shared; started only when not answering yet.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge: /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge: /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir="$(mktemp -d /tmp/sweep-slurm.XXXXXX)"
chmod 755 "$dir"
mkdir -p "$dir/state" "$dir/spool"
ctld_port="$(free_port)"; slurmd_port="$(free_port)"
cat >"$dir/slurm.conf" <<CONF
ClusterName=sweeptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
ReturnToService=2
MaxArraySize=1001
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
SchedulerParameters=sched_interval=1
# Trust the CPU count below even where the machine has fewer cores (tests oversubscribe).
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=2000 Features=sweeptest State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF"
/usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
  state="$(sinfo -h -n localhost -o %T 2>/dev/null || true)"
  case "$state" in idle*|mixed*|allocated*) break;; esac
  sleep 0.2
done
case "$state" in idle*|mixed*|allocated*) ;; *) echo "SLURM node not up (state '$state'); see $dir/*.log" >&2; exit 4;; esac
echo "$dir"
echo "SLURM_CONF=$SLURM_CONF"
