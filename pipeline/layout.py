"""Where every artifact lives under the results folder.

One place for the path conventions, used by the workflow (called with "{k}"-style placeholders it
returns Snakemake patterns) and by the report (called with values it returns the files to read).
"""

from __future__ import annotations

import re
from itertools import product

from pipeline import PipelineError
from pipeline.methods import needing

# In the demo dataset's root: {split: MNIST indices its scenes draw from}, checked against the
# pretraining corpus of the demo model.
DEMO_DIGITS_FILE = "mnist_indices.json"
# The `class` of the batch-loss rows of a joint inversion run in a tokens folder's loss.csv (each
# class's own rows sit beside them).
JOINT_LOSS_LABEL = "all"

# Files inside the folders stages write, part of the data contract (../shared/design.md):
CLASSES_FILE = "classes.json"  # prepare/: the class names, in label order
STATS_FILE = "stats.json"  # prepare/: image counts per split and class, and what was left out
MASKS_DIR = "masks"  # prepare/: one packed object mask per image
IMAGES_DIR = "images"  # prepare/: the images of a dataset stored as arrays (CIFAR), as PNG files
TOKENS_FILE = "tokens.json"  # a tokens folder: class -> token, and how they were learned
EMBEDDINGS_FILE = "learned_embeds.safetensors"  # a tokens folder, and each of its per-class folders
LOSS_FILE = "loss.csv"  # a tokens folder: step, class, loss
EXPORT_INDEX = "images.csv"  # an export folder: one row per exported PNG
# An adapter folder (dreambooth): the LoRA weights under the name diffusers' load_lora_weights looks
# for, and how they were trained (prompts, classes, sha256 of the weights).
ADAPTER_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_INFO_FILE = "adapter.json"
# The erase stage's folder: the UNet parameters it changed, and how (classes, prompt, sha256).
ERASED_WEIGHTS_FILE = "unet_erased.safetensors"
ERASE_INFO_FILE = "erase.json"
# The mvc stage's folder (a whole diffusers checkpoint): how it was fine-tuned and the sha256 of its weights.
MVC_INFO_FILE = "mvc.json"


def captions(results: str, k, trial_seed) -> str:
    """The caption stage's file of a subset: one caption per training image."""
    return f"{results}/captions/{subset_name(k, trial_seed)}.parquet"


def class_slug(class_name: str) -> str:
    """A class's name in its token and its tokens subfolder: lowercase, whitespace runs -> '-', and
    any other character unsafe in a file name -> '-'."""
    slug = re.sub(r"\s+", "-", class_name.strip().lower())
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in slug).strip(".")
    if not any(ch.isalnum() for ch in slug):
        raise PipelineError(f"class name {class_name!r} leaves nothing to name a token with. Expected letters or digits.")
    return slug


def subset_name(k, trial_seed) -> str:
    return f"k{k}_seed{trial_seed}"


def manifest(results: str) -> str:
    return f"{results}/prepare/manifest.parquet"


def prepared(results: str, name: str) -> str:
    """A file or folder `prepare` writes beside the manifest (CLASSES_FILE, STATS_FILE, MASKS_DIR)."""
    return f"{results}/prepare/{name}"


def subset(results: str, k, trial_seed) -> str:
    return f"{results}/subsets/{subset_name(k, trial_seed)}.parquet"


def tokens(results: str, k, trial_seed) -> str:
    return f"{results}/invert/{subset_name(k, trial_seed)}"


def adapter(results: str, kind: str, k, trial_seed) -> str:
    """The folder of a subset's adapted-model weights (kind: one of pipeline.methods.ADAPTERS)."""
    return f"{results}/{kind}/{subset_name(k, trial_seed)}"


def erased(results: str) -> str:
    """The folder of the UNet with the task's class names erased (one per task: every subset uses it)."""
    return f"{results}/erase"


def token_class_dir(tokens_dir, token: str) -> str:
    """The per-class folder of a tokens folder (one class's embedding, as diffusers' load_textual_inversion takes it)."""
    return f"{tokens_dir}/{token.strip('<>')}"


def token_samples(results: str, k, trial_seed) -> str:
    """The grid of text-to-image samples of a subset's tokens, one row per class; its legend is the .json beside it."""
    return f"{results}/invert/samples/{subset_name(k, trial_seed)}.png"


def grid_legend(grid_path) -> str:
    """The JSON legend written beside a sample grid (token samples, mix samples): what each row and column shows."""
    return str(grid_path).removesuffix(".png") + ".json"


def mix_samples(results: str, k, trial_seed) -> str:
    """The grid of a subset's mvc model under unmixed, fine-mixed and coarse-mixed caption embeddings; its legend is the .json beside it."""
    return f"{results}/mvc/samples/{subset_name(k, trial_seed)}.png"


def shard(results: str, method, k, trial_seed, index, count) -> str:
    return f"{results}/synthetic/{method}/{subset_name(k, trial_seed)}/shard-{index}-of-{count}.parquet"


def shards(results: str, method, k, trial_seed, count: int) -> list[str]:
    return [shard(results, method, k, trial_seed, i, count) for i in range(count)]


def real_features(results: str, split) -> str:
    return f"{results}/fid/real-{split}.npz"


def fid(results: str, method, k, trial_seed) -> str:
    return f"{results}/fid/{method}/{subset_name(k, trial_seed)}.json"


def oracle_scores(results: str, method, k, trial_seed) -> str:
    return f"{results}/oracle/{method}/{subset_name(k, trial_seed)}.json"


def metrics(results: str, method, k, trial_seed) -> str:
    return f"{results}/train/{method}/{subset_name(k, trial_seed)}.json"


def zeroshot(results: str) -> str:
    """Zero-shot CLIP's scores on the test split (with zeroshot.model)."""
    return f"{results}/zeroshot/test.json"


def report_dir(results: str) -> str:
    return f"{results}/report"


def subsets_in(config: dict) -> list[tuple[int, int]]:
    """Every (examples_per_class, trial_seed) pair the config asks for, in a stable order."""
    dataset = config["dataset"]
    return list(product(dataset["examples_per_class"], dataset["trial_seeds"]))


def expected_outputs(config: dict, generate_runs: list[str], train_runs: list[str]) -> dict[str, list[str]]:
    """The files a complete run of `config` produces, by kind (what the report reads). The
    per-method paths are those of run names (pipeline.sweeps.generate_runs and train_runs: each
    method and its sweep variants)."""
    results = config["results"]
    pairs = subsets_in(config)
    num_shards = config["generate"]["num_shards"]
    learns_tokens = bool(needing("tokens", config["generate"]["methods"]))
    fine_tunes_mvc = bool(needing("mvc", config["generate"]["methods"]))
    methods = generate_runs
    return {
        "tokens": [tokens(results, k, s) for k, s in pairs] if learns_tokens else [],
        "token_samples": [token_samples(results, k, s) for k, s in pairs] if learns_tokens else [],
        "mix_samples": [mix_samples(results, k, s) for k, s in pairs] if fine_tunes_mvc else [],
        "metrics": [metrics(results, m, k, s) for m in train_runs for k, s in pairs],
        "fid": [fid(results, m, k, s) for m in methods for k, s in pairs],
        "oracle": [oracle_scores(results, m, k, s) for m in methods for k, s in pairs] if config["fid"]["oracle"] else [],
        "zeroshot": [zeroshot(results)] if config["zeroshot"]["model"] else [],
        "shards": [p for m in methods for k, s in pairs for p in shards(results, m, k, s, num_shards)],
    }
