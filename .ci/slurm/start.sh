#!/usr/bin/env bash
# Start a one-node SLURM cluster on this host (munged, slurmctld, slurmd), for tests/test_slurm.py.
#
#   bash .ci/slurm/start.sh     # about 10 s; installing the Debian packages first adds about 20 s
#   bash .ci/slurm/stop.sh      # cancels its jobs, stops exactly the daemons this script started
#
# Needs root (CI containers). Writes /etc/slurm/{slurm.conf,gres.conf}, which every SLURM command
# reads, and refuses to overwrite ones it did not write. State and logs go to $DAFUSION_SLURM_STATE;
# the PIDs of the daemons started here go to $DAFUSION_SLURM_STATE/pids, which stop.sh reads.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${DAFUSION_SLURM_STATE:-/tmp/dafusion-slurm}"
PARTITION="${DAFUSION_SLURM_PARTITION:-ci}"
HOST="$(hostname -s)"
CPUS="$(nproc)"
GPUS="${DAFUSION_SLURM_GPUS:-$CPUS}"  # placeholders: as many GPU jobs at once as there are cores
CONF_DIR=/etc/slurm
MARKER="# dafusion-ci"
START_TIMEOUT=60

log() { echo "[slurm start] $*"; }
die() { echo "[slurm start] error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it starts munged, slurmctld and slurmd). Got uid $(id -u)."
if [ -s "$STATE/pids" ]; then
    die "$STATE/pids exists: a cluster started by this script may still run. Run .ci/slurm/stop.sh first."
fi
for conf in slurm.conf gres.conf; do
    if [ -e "$CONF_DIR/$conf" ] && ! head -n1 "$CONF_DIR/$conf" | grep -q "^$MARKER"; then
        die "$CONF_DIR/$conf exists and was not written by this script; not overwriting a real cluster's config."
    fi
done

started=$(date +%s)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

# If anything below fails, stop what was started so far.
trap 'status=$?; if [ $status -ne 0 ]; then echo "[slurm start] failed; logs in $STATE; stopping what was started" >&2; bash "$HERE/stop.sh" || true; fi' EXIT

record_pid() {  # name, PID file: the daemon forks and writes its PID file a moment later
    local deadline=$(( $(date +%s) + 10 ))
    until [ -s "$2" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || die "$1 wrote no PID file $2 within 10 s; see its log in $STATE"
        sleep 0.2
    done
    echo "$1 $(cat "$2")" >> "$STATE/pids"
}

rm -rf "$STATE"
mkdir -p "$STATE/slurmctld" "$STATE/slurmd"
: > "$STATE/pids"

# munge: the key the package generated (or a new one), the daemon as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 755 /run/munge
rm -f /run/munge/munged.pid
runuser -u munge -- munged --pid-file=/run/munge/munged.pid
record_pid munged /run/munge/munged.pid
munge -n | unmunge >/dev/null || die "munge cannot encode and decode a credential; see /var/log/munge/munged.log"

# This node as slurmd sees it: usable memory in MB.
MEMORY="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)"
[ -n "$MEMORY" ] || die "slurmd -C reported no RealMemory. Got: $(slurmd -C)"
for (( i = 0; i < GPUS; i++ )); do ln -s /dev/null "$STATE/gpu$i"; done
render() {
    sed -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY@|$MEMORY|g" -e "s|@GPUS@|$GPUS|g" \
        -e "s|@LASTGPU@|$(( GPUS - 1 ))|g" -e "s|@STATE@|$STATE|g" -e "s|@PARTITION@|$PARTITION|g" "$1"
}
mkdir -p "$CONF_DIR"
render "$HERE/slurm.conf.in" > "$CONF_DIR/slurm.conf"
render "$HERE/gres.conf.in" > "$CONF_DIR/gres.conf"

# -c: start from a clean state (no jobs from an earlier cluster).
slurmctld -c
record_pid slurmctld "$STATE/slurmctld.pid"
slurmd
record_pid slurmd "$STATE/slurmd.pid"

deadline=$(( $(date +%s) + START_TIMEOUT ))
until [ "$(sinfo -h -n "$HOST" -o %T 2>/dev/null)" = "idle" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        sinfo -N -l || true
        tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
        die "node $HOST did not become idle within ${START_TIMEOUT} s (sinfo state: '$(sinfo -h -n "$HOST" -o %T 2>/dev/null)')"
    fi
    sleep 1
done

# A GPU job, as the workflow's GPU rules submit them, must run to completion.
if ! timeout "$START_TIMEOUT" sbatch --wait --quiet --gpus=1 --cpus-per-gpu=1 --mem=100 \
        --output="$STATE/smoke.out" --wrap 'echo ok on $(hostname -s)'; then
    die "a --gpus=1 test job did not complete within ${START_TIMEOUT} s; see $STATE/slurmctld.log and $STATE/slurmd.log"
fi
grep -q "^ok on $HOST" "$STATE/smoke.out" || die "the test job wrote unexpected output: $(cat "$STATE/smoke.out")"

log "cluster up in $(( $(date +%s) - started )) s: partition '$PARTITION' on $HOST ($CPUS CPUs, ${MEMORY} MB, $GPUS placeholder GPUs); state and logs in $STATE"
