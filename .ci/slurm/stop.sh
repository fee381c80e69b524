#!/usr/bin/env bash
# Stop the cluster .ci/slurm/start.sh started: cancel its jobs, then end exactly the daemons whose
# PIDs it recorded (each checked against its name, so a reused PID is left alone), and remove the
# config files it wrote. Safe to run twice, or after a start that failed half-way.
set -uo pipefail

STATE="${DAFUSION_SLURM_STATE:-/tmp/dafusion-slurm}"
CONF_DIR=/etc/slurm
MARKER="# dafusion-ci"
STOP_TIMEOUT=20

log() { echo "[slurm stop] $*"; }

if [ ! -f "$STATE/pids" ]; then
    log "nothing to stop ($STATE/pids does not exist)"
    exit 0
fi

# Jobs first: their processes are children of slurmstepd, which outlives slurmd.
if grep -q "^slurmctld " "$STATE/pids" && command -v scancel >/dev/null; then
    jobs="$(squeue --noheader --format=%i 2>/dev/null || true)"
    # shellcheck disable=SC2086  # one argument per job id
    [ -z "$jobs" ] || scancel $jobs 2>/dev/null || true
    deadline=$(( $(date +%s) + STOP_TIMEOUT ))
    while [ -n "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && [ "$(date +%s)" -lt "$deadline" ]; do
        sleep 1
    done
fi

is_ours() {  # PID still runs the daemon it was recorded for
    [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]
}

# Reverse start order: slurmd, slurmctld, munged.
tac "$STATE/pids" | while read -r name pid; do
    if is_ours "$name" "$pid"; then
        kill -TERM "$pid"
        deadline=$(( $(date +%s) + STOP_TIMEOUT ))
        while is_ours "$name" "$pid" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
        if is_ours "$name" "$pid"; then
            log "$name ($pid) did not stop within ${STOP_TIMEOUT} s; killing it"
            kill -KILL "$pid"
        fi
        log "stopped $name ($pid)"
    else
        log "$name ($pid) is not running"
    fi
done
rm -f "$STATE/pids"

for conf in slurm.conf gres.conf; do
    if [ -e "$CONF_DIR/$conf" ] && head -n1 "$CONF_DIR/$conf" | grep -q "^$MARKER"; then
        rm -f "$CONF_DIR/$conf"
    fi
done
