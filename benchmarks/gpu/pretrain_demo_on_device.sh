#!/usr/bin/env bash
# The demo model's longer pretraining (issue 14's open target: digits drawn from text), as ONE command
# on the lent GPU machine (offline, bare). It fits one call of the device tool:
#
# Here, first (wheels and CLIP tokenizer files into the git-ignored .gpu-carry/):
#     bash benchmarks/gpu/fill_carry.sh
# Then with the device tool, in one call:
#     run  command: bash benchmarks/gpu/pretrain_demo_on_device.sh
#          carry:   [".gpu-carry"]
#          timeout_s: 560
# What comes back under $OUT (5 files): summary.md (the step time, the step count chosen, the losses
# and the oracle's text-to-image shares of the new model), environment.txt, pretrain.log, and the
# model as demo-sd.tar.part-aa and -ab (the device tool returns files of at most 16 MiB). Here:
#     cat /work/.device/.../demo-sd.tar.part-* | tar -x -C /tmp && python benchmarks/gpu/demo_text_check.py --model /tmp/demo-sd
# then, if it draws digits from text, replace models/demo-sd with it and re-measure (BENCHMARKS.md,
# "The demo model"): the shipped model's figures, the oracle tests and the default run all rest on it.
#
# How many steps. The script first times 300 UNet steps and 200 VAE steps at the real batch sizes on a
# small corpus, then gives the UNet as many steps as the rest of its BUDGET_S (440 s) affords after
# the VAE phase, the corpus and the check, rounded down to a thousand and at most MAX_STEPS (60,000).
# The count is passed as --set demo_model.unet.steps=N and recorded in demo_model.json, so the run can
# be repeated by its command. CUDA kernels are not bitwise repeatable; batches, noise and crops are.
#
# Smoke run here, on CPU (a tiny corpus and a few steps; Python sees only the GPU machine's packages
# plus the carried ones, through device_site/sitecustomize.py):
#     bash benchmarks/gpu/fill_carry.sh 3.11 /tmp/carry-3.11 && SMOKE=1 CARRY=/tmp/carry-3.11 bash benchmarks/gpu/pretrain_demo_on_device.sh
# shellcheck source=benchmarks/gpu/device_prelude.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_prelude.sh"
summary=$out/summary.md
config=config/demo-model-gpu.yaml
budget=${BUDGET_S:-440}
max_steps=${MAX_STEPS:-60000}

if [[ $smoke == 1 ]]; then  # the same steps, sized for a 2-core CPU
    device=cpu samples=2
    sizes=(--set demo_model.corpus_images=64 --set demo_model.vae.steps=20 --set demo_model.unet.batch_size=4
           --set demo_model.vae.batch_size=4 --set demo_model.checkpoint_every=100000)
    calibration_unet=10 calibration_vae=10 reserve=20 step_round=10
else
    device=cuda samples=16
    sizes=()
    calibration_unet=300 calibration_vae=200 reserve=90 step_round=1000
fi

install_carried_packages
record_environment
if ! imports_ok; then
    echo "pretrain_demo_on_device: the imports failed; see environment.txt" | tee "$summary"
    tail -n 20 "$out/environment.txt"
    exit 1
fi

pretrain() {  # pretrain OUT_FOLDER [--set ...]: the repository's own command, on $device
    local target=$1
    shift
    "$python" -m pipeline pretrain-demo-model --config "$config" --set "device=$device" "${sizes[@]}" "$@" \
        --tokenizer-files "$carry/clip" --out "$target"
}
{
    echo "# The demo model's pretraining on $device ($(date -u +%Y-%m-%d))"
    echo
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    grep -E '^(python|torch|gpu|diffusers|transformers):' "$out/environment.txt" || true
} | tee "$summary"

start=$SECONDS
pretrain "$work/calibration" --set demo_model.corpus_images=2000 --set "demo_model.vae.steps=$calibration_vae" \
    --set "demo_model.unet.steps=$calibration_unet" 2>"$out/pretrain.log"
left=$((budget - (SECONDS - start)))
read -r unet_step vae_step steps < <("$python" benchmarks/gpu/plan_pretraining.py --calibration "$work/calibration" \
    --config "$config" "${sizes[@]}" --left "$left" --reserve "$reserve" --round "$step_round" --max "$max_steps")
{
    echo
    echo "Calibration ($((SECONDS - start)) s): $unet_step s per UNet step, $vae_step s per VAE step; $left s of the $budget s budget left."
    echo "UNet steps chosen: $steps"
    echo
    echo "    python -m pipeline pretrain-demo-model --config $config --set demo_model.unet.steps=$steps --out models/demo-sd"
} | tee -a "$summary"

pretrain "$work/demo-sd" --set "demo_model.unet.steps=$steps" 2>>"$out/pretrain.log"
"$python" -c 'import json, sys; info = json.load(open(sys.argv[1] + "/demo_model.json"))
print("\ntrain seconds:", info["train_seconds"], "\nfinal loss (mean of the last 100 steps):", info["final_loss"])' "$work/demo-sd" | tee -a "$summary"
echo | tee -a "$summary"
"$python" benchmarks/gpu/demo_text_check.py --model "$work/demo-sd" --device "$device" --samples "$samples" 2>>"$out/pretrain.log" | tee -a "$summary"

tar -C "$work" -cf - demo-sd | split -b 15M - "$out/demo-sd.tar.part-"
echo | tee -a "$summary"
echo "whole script: $SECONDS s; model parts: $(ls "$out" | grep -c '^demo-sd.tar.part-')" | tee -a "$summary"
