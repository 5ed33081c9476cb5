#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 for the dispatch tests (Debian's slurm-wlm + munge; no systemd).
# Idempotent: installs slurm-wlm and munge if missing (apt-get, time-bounded), writes /etc/slurm/slurm.conf
# (node `localhost` with this machine's CPUs and memory from `slurmd -C`; partitions `debug` (default) and
# `gpu` on the same node), creates the munge key if missing, starts munged, slurmctld and slurmd as daemons
# and waits until `sinfo` shows the node idle.  Prints one line; exits non-zero with the reason if Slurm
# does not come up.  Needs root.  .ci/slurm/stop.sh stops it.
#
# Environment: SLURM_CI_NO_INSTALL=1 (do not apt-get; fail if not installed), SLURM_CI_WAIT (seconds to wait
# for the node, default 60), SLURM_CI_APT_TIMEOUT (seconds for apt-get update + install, default 600).
set -euo pipefail

t0=$SECONDS
CONF=/etc/slurm/slurm.conf
MARK="# written by .ci/slurm/start.sh"
LOGDIR=/var/log/slurm
WAIT=${SLURM_CI_WAIT:-60}
note=""

fail() { echo "slurm: not started: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (it writes $CONF and starts daemons)"
exec 9>/run/slurm-ci-start.lock   # one start at a time (parallel test sessions may all try)
flock -w 900 9 || fail "another .ci/slurm/start.sh holds /run/slurm-ci-start.lock"

# -- install ---------------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
   || ! command -v munged >/dev/null; then
    [ "${SLURM_CI_NO_INSTALL:-0}" = 1 ] && fail "slurm-wlm/munge are not installed (SLURM_CI_NO_INSTALL=1)"
    command -v apt-get >/dev/null || fail "slurm-wlm/munge are not installed and there is no apt-get"
    ti=$SECONDS
    log=$(mktemp /tmp/slurm-apt.XXXXXX.log)
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout "${SLURM_CI_APT_TIMEOUT:-600}" bash -c \
        'apt-get -q -o Acquire::Retries=3 update && apt-get -q -y -o Acquire::Retries=3 \
         -o Dpkg::Use-Pty=0 install --no-install-recommends slurm-wlm munge' >"$log" 2>&1; then
        tail -n 5 "$log" >&2
        fail "apt-get install slurm-wlm munge failed (log: $log)"
    fi
    rm -f "$log"
    note=", installed slurm-wlm+munge in $((SECONDS - ti)) s"
fi

# -- slurm.conf ------------------------------------------------------------------------------------------
hw=$(slurmd -C | head -n 1) || fail "slurmd -C failed"
node_hw=$(sed -e 's/^NodeName=[^ ]* //' <<<"$hw")   # CPUs=.. Boards=.. ... RealMemory=..
conf="$MARK: a one-node test cluster on 127.0.0.1
ClusterName=ci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 $node_hw State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP"

alive() {   # alive PIDFILE NAME: the pid file names a live process called NAME (not a reused pid)
    [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]
}
node_state() { timeout 10 sinfo -h -n localhost -o %T 2>/dev/null | head -n 1; }

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    fail "$CONF exists and was not written by this script: not touching a real cluster's configuration"
fi
if [ "$(cat "$CONF" 2>/dev/null)" != "$conf" ]; then
    if alive /run/slurmctld.pid slurmctld || alive /run/slurmd.pid slurmd; then   # ours, with another configuration
        "$(dirname "$0")/stop.sh" --keep-munge >/dev/null
    fi
    mkdir -p /etc/slurm
    printf '%s\n' "$conf" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
fi

# -- munge -----------------------------------------------------------------------------------------------
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --force 9>&- || fail "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
    (munge -n | unmunge) >/dev/null 2>&1 || fail "munge does not answer (see /var/log/munge/munged.log)"
fi

# -- daemons ---------------------------------------------------------------------------------------------
mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
if ! alive /run/slurmctld.pid slurmctld; then
    slurmctld 9>&- || fail "slurmctld did not start (see $LOGDIR/slurmctld.log)"
fi
if ! alive /run/slurmd.pid slurmd; then
    slurmd -N localhost 9>&- || fail "slurmd did not start (see $LOGDIR/slurmd.log)"
fi

# -- wait for the node -----------------------------------------------------------------------------------
deadline=$((SECONDS + WAIT))
state=""
while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*|fail*)   # e.g. a restart after a configuration change: take it back
            scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *) reason=$(timeout 10 scontrol show node localhost 2>/dev/null | grep -o 'Reason=.*' || true)
       tail -n 3 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 2>/dev/null || true
       fail "node localhost is '${state:-unknown}' after ${WAIT} s ${reason}(logs: $LOGDIR)" ;;
esac
parts=$(timeout 10 sinfo -h -o %P | sort -u | tr '\n' ' ')
echo "slurm: up in $((SECONDS - t0)) s$note: node localhost $state ($(grep -o 'CPUs=[0-9]*' <<<"$node_hw"), \
$(grep -o 'RealMemory=[0-9]*' <<<"$node_hw") MB), partitions ${parts% }"
