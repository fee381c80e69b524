"""Checks of a local Stable Diffusion checkpoint folder before any job loads it (no torch needed,
so the workflow runs them at DAG time too).

Every folder must hold a diffusers SD checkpoint whose parts fit together; one that records the
sha256 of its weights (`demo_model.json`, written by `pipeline.demo_model`) must match them, so a
truncated, corrupt or swapped weights file is named in one line instead of failing inside a job.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline import PipelineError
from pipeline.io import read_json

INFO_FILE = "demo_model.json"
# Files a diffusers SD checkpoint folder must hold for every stage to load it.
REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)


# In a local model folder, the files no stage reads: its documentation and its training log.
UNREAD_FILES = frozenset({"README.md", "loss.csv"})


def model_files(folder: str | Path) -> list[str]:
    """The files of a local model folder that are inputs of the jobs using it, so that replacing its
    weights reruns them and editing its README does not."""
    return sorted(str(path) for path in Path(folder).rglob("*") if path.is_file() and path.name not in UNREAD_FILES)


def is_local(model_id: str) -> bool:
    """Whether `model.id` names a folder on this machine rather than a hub id."""
    path = Path(model_id).expanduser()
    return path.is_absolute() or model_id.startswith(".") or path.exists()


def verify_if_local(model_id: str) -> None:
    if is_local(model_id):
        verify_checkpoint(model_id)


def check_corpus_disjoint(model_id: str, evaluated: dict[str, list[int]], where: str) -> None:
    """Refuse a demo dataset whose digits (`evaluated`: {split: MNIST indices}) overlap the corpus
    the demo model was pretrained on, as recorded in its demo_model.json (no record: nothing to check)."""
    info_path = Path(model_id) / INFO_FILE
    if not (is_local(model_id) and info_path.is_file()):
        return
    corpus = set(read_json(info_path).get("corpus_mnist_indices", []))
    for split, indices in evaluated.items():
        shared = corpus.intersection(indices)
        if shared:
            raise PipelineError(
                f"{where}: {len(shared)} MNIST digits of the demo's {split} split (e.g. index {min(shared)}) are in the "
                f"pretraining corpus of {model_id} ({info_path}). Expected disjoint pools (pipeline.demo.POOL_SHARES): "
                "rebuild the demo dataset or retrain the model."
            )


def weight_hashes(model_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every weights file of a checkpoint folder."""
    return {
        str(path.relative_to(model_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(model_dir.rglob("*.safetensors"))
    }


def check_recorded_hashes(folder: Path, info_path: Path) -> None:
    """The weights files of `folder` must be exactly those `info_path` records under `sha256`
    ({relative path: digest}), with those digests."""
    recorded = read_json(info_path).get("sha256", {})
    found = weight_hashes(folder)
    for name, digest in recorded.items():
        if name not in found:
            raise PipelineError(f"{folder / name}: missing; {info_path.name} records it with sha256 {digest}")
        if found[name] != digest:
            raise PipelineError(
                f"{folder / name}: sha256 {found[name][:12]}... does not match {digest[:12]}... recorded in {info_path}: "
                "the file is truncated, corrupt or from another model. Restore it (git checkout) or retrain (see its README)."
            )
    extra = sorted(set(found) - set(recorded))
    if extra:
        raise PipelineError(f"{folder}: weights {', '.join(extra)} are not recorded in {info_path.name}; expected only {', '.join(sorted(recorded))}")


def verify_checkpoint(model_dir: str | Path) -> None:
    """Check a local checkpoint folder before anything loads it.

    Every folder must hold the files of a diffusers SD checkpoint; one with `demo_model.json` (the
    shipped demo model) must also have weights whose sha256 match the recorded ones, so a truncated,
    corrupt or swapped file is named here instead of failing inside a job.
    """
    model_dir = Path(model_dir)
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise PipelineError(f"model.id: {model_dir} is not a Stable Diffusion checkpoint in diffusers format: missing {', '.join(missing)}")
    _check_architecture(model_dir)
    info_path = model_dir / INFO_FILE
    if not info_path.is_file():
        return
    check_recorded_hashes(model_dir, info_path)

def _check_architecture(model_dir: Path) -> None:
    """The components must fit together as SD 1.x's do (text width = cross-attention width, VAE
    latents = UNet channels, or twice them for an image-conditioned UNet as MVC's and InstructPix2Pix's),
    so a folder mixing two models is named before a job loads it."""
    configs = {}
    for name in ("unet", "vae", "text_encoder"):
        try:
            configs[name] = read_json(model_dir / name / "config.json")
        except PipelineError as exc:
            raise PipelineError(f"model.id: {exc}") from None
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    expected = {
        "unet cross_attention_dim = text_encoder hidden_size": (unet.get("cross_attention_dim"), text.get("hidden_size")),
        "unet in_channels = vae latent_channels": (unet.get("in_channels"), vae.get("latent_channels")),
    }
    image_conditioned = vae.get("latent_channels") is not None and unet.get("in_channels") == 2 * vae["latent_channels"]
    if image_conditioned:
        expected.pop("unet in_channels = vae latent_channels")
    for what, (got, want) in expected.items():
        if got != want:
            raise PipelineError(f"model.id: {model_dir} is not one Stable Diffusion checkpoint: expected {what}, got {got} and {want}")
