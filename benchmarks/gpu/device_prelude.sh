# Sourced by the scripts that run on the lent GPU machine (run_on_device.sh, pretrain_demo_on_device.sh):
# the settings they share, the carried packages installed offline, and environment.txt.
# Sets repo, smoke, carry, python, out (the device tool's $OUT, or a scratch folder for a smoke run
# here) and work (a scratch folder removed on exit), and changes to the repository's root.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
repo=$PWD

smoke=${SMOKE:-0}
carry=${CARRY:-$repo/.gpu-carry}
python=${PYTHON:-python3}
out=${OUT:-$(mktemp -d)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# The carried packages, installed without network into a folder of their own; a smoke run here sees
# only the GPU machine's packages plus those (device_site/sitecustomize.py).
install_carried_packages() {
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$carry"/wheels/*.whl
    export PYTHONPATH=$work/site:$repo${PYTHONPATH:+:$PYTHONPATH}
    if [[ $smoke == 1 ]]; then
        export PYTHONPATH=$repo/benchmarks/gpu/device_site:$PYTHONPATH
    fi
}

# environment.txt: date, machine, nvidia-smi, versions, and whether the imports load (its last line).
record_environment() {
    {
        date -u
        uname -a
        timeout 30 nvidia-smi || echo "nvidia-smi: not available"
        nproc
        free -g
        timeout 120 "$python" benchmarks/gpu/versions.py
    } >"$out/environment.txt" 2>&1 || true
}

imports_ok() {
    grep -q '^imports: ok' "$out/environment.txt"
}
