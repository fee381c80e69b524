import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline import PipelineError
from pipeline.io import atomic_path, decode_image, encode_png, open_image, read_metadata, read_parquet, write_parquet
from pipeline.rng import derive_seed, numpy_rng, torch_generator


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "file.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_path_replaces_folders_whole(tmp_path):
    target = tmp_path / "tokens"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_parquet_metadata_round_trip(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet(path, pa.table({"x": [1, 2]}), {"classes": ["a", "b"], "trial_seed": 3})
    assert read_metadata(path) == {"classes": ["a", "b"], "trial_seed": 3}
    assert read_parquet(path).column("x").to_pylist() == [1, 2]


def test_unreadable_inputs_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(PipelineError, match="bad.png"):
        open_image(bad)
    with pytest.raises(PipelineError, match="syn-7"):
        decode_image(b"garbage", what="syn-7")
    with pytest.raises(PipelineError, match="bad.png"):
        read_parquet(bad)


def test_png_round_trip_is_lossless():
    image = Image.new("RGB", (5, 4), (10, 200, 30))
    assert decode_image(encode_png(image)).getpixel((2, 2)) == (10, 200, 30)


def test_derived_seeds_are_stable_and_distinct():
    # Pinned: changing the derivation would silently change every synthetic image.
    assert derive_seed(0, "generate", "img-1", 0) == 4264394866974146550
    assert derive_seed(0, "generate", "img-1", 0) != derive_seed(0, "generate", "img-1", 1)
    assert derive_seed(1, "a") != derive_seed("1", "a")  # types are part of the key
    assert 0 <= derive_seed("x") < 2**63
    assert torch.equal(torch.randn(3, generator=torch_generator(5, "s")), torch.randn(3, generator=torch_generator(5, "s")))
    assert numpy_rng(1, "s").integers(1 << 30) == numpy_rng(1, "s").integers(1 << 30)
