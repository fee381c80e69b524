#!/usr/bin/env bash
# The GPU measurements of the generation issue, as ONE command on the lent GPU machine (offline, bare).
#
# Here, first (wheels and CLIP tokenizer files into the git-ignored .gpu-carry/, about 8 MiB):
#     bash benchmarks/gpu/fill_carry.sh
# Then with the device tool, in one call:
#     run  command: bash benchmarks/gpu/run_on_device.sh
#          carry:   [".gpu-carry"]
#          timeout_s: 540
# Everything comes back under $OUT (8 files, the most the tool returns): summary.md (every table, and
# which step did what), environment.txt (nvidia-smi, versions), and the stderr of each step: build.log,
# generate-float16.log, memory-float16.log, generate-bfloat16.log, invert.log, generate-channels-last.log.
#
# Smoke run here, on CPU (64 px, 2 scheduled steps, 2 images, the full-size model; Python sees only the
# GPU machine's packages plus the carried ones, through device_site/sitecustomize.py):
#     bash benchmarks/gpu/fill_carry.sh 3.11 /tmp/carry-3.11 && SMOKE=1 CARRY=/tmp/carry-3.11 bash benchmarks/gpu/run_on_device.sh
#
# What the numbers mean. SD 1.x at 512 px (latent 64x64), counted with torch.utils.flop_counter:
# one UNet evaluation of one image is 0.80 TFLOP, 1.61 with classifier-free guidance (two evaluations);
# t0 = 0.5 of 50 scheduled steps runs 25 of them, 40.2 TFLOP; the VAE decode adds 2.5 and the encode
# 1.1 (once per source in ours, once per image in the reference): about 44 TFLOP per image. At the
# issue's 40% of an H100's (and H200's) 990 TFLOP/s dense fp16 that is 9 images/s; TFLOP/s achieved
# is about 44 x images/s.
#
# Time on an H200, estimated (the script stops starting steps when its BUDGET_S, 420 s, runs low, and
# bounds each step with its own limit):
#   install wheels, versions            ~10 s
#   build (1.07 B parameters initialised on the GPU, 4.3 GB of float32 written)   ~30 s   limit 150 s
#   generate float16: 7 loads of ~4 s, ours 4 x 64 images at batch 8/16/32/64 at ~10 images/s,
#     reference 16 images at ~1 image/s (25 UNet calls of batch 2 each, launch-bound)   ~90 s   limit 180 s
#   memory float16: batch 1..64 at 10 steps, then the batch_size auto probe           ~40 s   limit 120 s
#   generate bfloat16: ours at batch 16 and 64, reference 8 images                    ~60 s   limit 120 s
#   invert: 512 px, batch 4, 10 steps of each loop, 1 repeat, 4 loads                 ~50 s   limit 120 s
#   generate float16 channels-last (generate.channels_last), as bfloat16's sizes, if the budget allows   ~60 s   limit 120 s
# about 6 minutes in all.
# shellcheck source=benchmarks/gpu/device_prelude.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_prelude.sh"
summary=$out/summary.md
steps_table=$work/steps.md

if [[ $smoke == 1 ]]; then  # the same steps, sized for a 2-core CPU
    device=cpu resolution=64 steps=2 threads=2 budget=${BUDGET_S:-1800}
    images=2 per_image=1 batches="1 2" reference_images=2 bf16_batches=2 bf16_reference_images=1
    memory_batches="1 2" invert_steps=2 invert_batch=1
    limit_build=300 limit_generate=600 limit_memory=120 limit_bf16=600 limit_invert=600
else
    device=cuda resolution=512 steps=50 threads=4 budget=${BUDGET_S:-420}
    images=16 per_image=4 batches="8 16 32 64" reference_images=16 bf16_batches="16 64" bf16_reference_images=8
    memory_batches="1 2 4 8 16 32 64" invert_steps=10 invert_batch=4
    limit_build=150 limit_generate=180 limit_memory=120 limit_bf16=120 limit_invert=120
fi
deadline=$((SECONDS + budget))

# step NAME LIMIT_S LOG COMMAND...: run COMMAND for at most LIMIT_S seconds, fewer if the budget has
# fewer left; its stdout (the results) goes to summary.md and the screen, its stderr to $out/LOG. A
# failure or a time-out is recorded with the end of its log, and the next step still runs.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((deadline - SECONDS)) start=$SECONDS status
    if ((left < 30)); then
        echo "| $name | skipped: ${left} s of the budget left | 0 |" >>"$steps_table"
        return 0
    fi
    ((limit <= left)) || limit=$left
    echo "== $name (at most $limit s)"
    printf '\n## %s\n\n' "$name" >>"$summary"
    if timeout --kill-after=15 "$limit" "$@" 2>"$out/$log" | tee -a "$summary"; then
        status=ok
    else
        status="failed with exit status $? (124: ran past its $limit s)"
        # shellcheck disable=SC2016  # the backquotes are Markdown, not a command
        printf '\n%s; the end of %s:\n\n```\n%s\n```\n' "$status" "$log" "$(tail -n 20 "$out/$log")" | tee -a "$summary"
    fi
    echo "| $name | $status | $((SECONDS - start)) |" >>"$steps_table"
}

install_carried_packages
record_environment
{
    echo "# GPU benchmarks of batched SDEdit ($(date -u +%Y-%m-%d), $( ((smoke)) && echo 'SMOKE run on CPU' || echo "$device"))"
    echo
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
    echo
    grep -E '^(python|torch|gpu|diffusers|transformers|huggingface_hub|imports):' "$out/environment.txt" || true
    echo
    echo "Per image at 512 px, t0 0.5 of 50 steps, guidance 7.5: about 44 TFLOP (UNet 40.2 with both guidance halves,"
    echo "VAE decode 2.5, encode 1.1); the target, 9 images/s, is 40% of 990 TFLOP/s dense fp16. TFLOP/s ~ 44 x images/s."
} | tee "$summary"
if ! imports_ok; then
    echo "run_on_device: the benchmarks' imports failed; see environment.txt" | tee -a "$summary"
    tail -n 20 "$out/environment.txt"
    exit 1
fi

model=$work/random-sd1
step "build random SD 1.x" "$limit_build" build.log \
    "$python" benchmarks/gpu/build_random_sd1.py --out "$model" --device "$device" --dtype float32 --tokenizer-files "$carry/clip"
if [[ ! -f $model/model_index.json ]]; then
    echo "run_on_device: no model was built; see build.log" | tee -a "$summary"
    exit 1
fi

# shellcheck disable=SC2086  # the batch-size lists are meant to split into words
step "generate float16 (t0 0.5, $steps steps, $resolution px)" "$limit_generate" "generate-float16.log" \
    "$python" benchmarks/bench_generate.py --device "$device" --dtype float16 --model "$model" --resolution "$resolution" \
    --steps "$steps" --strength 0.5 --images "$images" --per-image "$per_image" --batch-size $batches \
    --reference-images "$reference_images" --target 9 --threads "$threads"
# shellcheck disable=SC2086
step "peak memory per batch size, batch_size auto (float16)" "$limit_memory" "memory-float16.log" \
    "$python" benchmarks/bench_generate_memory.py --model "$model" --resolution "$resolution" --dtype float16 \
    --steps 10 --batch-sizes $memory_batches
# shellcheck disable=SC2086
step "generate bfloat16 (t0 0.5, $steps steps, $resolution px)" "$limit_bf16" "generate-bfloat16.log" \
    "$python" benchmarks/bench_generate.py --device "$device" --dtype bfloat16 --model "$model" --resolution "$resolution" \
    --steps "$steps" --strength 0.5 --images "$images" --per-image "$per_image" --batch-size $bf16_batches \
    --reference-images "$bf16_reference_images" --target 9 --threads "$threads"
step "textual inversion steps/s ($resolution px, batch $invert_batch)" "$limit_invert" invert.log \
    "$python" benchmarks/bench_invert.py --device "$device" --model "$model" --resolution "$resolution" \
    --steps "$invert_steps" --batch-size "$invert_batch" --repeats 1
# shellcheck disable=SC2086
step "generate float16 channels-last (t0 0.5, $steps steps, $resolution px)" "$limit_bf16" "generate-channels-last.log" \
    "$python" benchmarks/bench_generate.py --device "$device" --dtype float16 --channels-last --model "$model" \
    --resolution "$resolution" --steps "$steps" --strength 0.5 --images "$images" --per-image "$per_image" \
    --batch-size $bf16_batches --reference-images "$bf16_reference_images" --target 9 --threads "$threads"

{
    printf '\n## Steps\n\n| step | status | seconds |\n|---|---|---:|\n'
    cat "$steps_table"
    echo
    echo "whole script: $SECONDS s"
} | tee -a "$summary"
if grep -qE '\| (failed|skipped)' "$steps_table"; then
    exit 1
fi
