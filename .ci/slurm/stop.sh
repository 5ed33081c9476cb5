#!/usr/bin/env bash
# Stop the one-node cluster .ci/slurm/start.sh started: slurmd, slurmctld, then munged (--keep-munge: leave
# munged running).  Only the daemons named by their pid files are signalled.  Idempotent.
set -uo pipefail

stop() {   # stop NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null && grep -q "$name" "/proc/$pid/comm" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "slurm: stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
[ "${1:-}" = --keep-munge ] || stop munged /run/munge/munged.pid
exit 0
