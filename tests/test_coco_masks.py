"""The fast mask path of COCO prepare against pycocotools and PIL: RLE strings decoded straight into
packed rows, and the 1-bit PNG written without PIL's encoder."""

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import PipelineError
from pipeline.datasets import LabelContext, write_mask
from pipeline.datasets.coco import _compressed_run_lengths, _packed_mask_rows


def random_masks(rng: np.random.Generator):
    """Blobs, noise, empty and full masks, at widths on and off multiples of 8 and 64."""
    for height, width in [(1, 1), (3, 7), (8, 64), (17, 65), (31, 130), (48, 200)]:
        yield np.zeros((height, width), bool)
        yield np.ones((height, width), bool)
        yield rng.random((height, width)) < 0.5
        yy, xx = np.mgrid[:height, :width]
        cy, cx, r = rng.integers(height), rng.integers(width), rng.integers(1, max(height, width) + 1)
        yield (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def test_packed_rows_from_rle_equal_pycocotools_decode():
    for mask in random_masks(np.random.default_rng(0)):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = _compressed_run_lengths(rle["counts"], "test")
        assert runs.sum() == mask.size
        decoded = mask_utils.decode(rle).astype(bool)
        assert np.array_equal(decoded, mask)
        packed = _packed_mask_rows(runs, *mask.shape)
        assert np.array_equal(packed, np.packbits(mask, axis=1)), mask.shape


def test_written_mask_reads_back_as_the_same_pixels(tmp_path):
    context = LabelContext(tmp_path, tmp_path / "masks", frozenset())
    (tmp_path / "masks").mkdir()
    for i, mask in enumerate(random_masks(np.random.default_rng(1))):
        relative = write_mask(context, f"img-{i}", mask)
        with Image.open(tmp_path / "masks" / relative) as image:
            assert image.mode == "1" and image.size == (mask.shape[1], mask.shape[0])
            assert np.array_equal(np.asarray(image), mask), (i, mask.shape)


def test_overlong_rle_number_is_refused():
    with pytest.raises(PipelineError, match="test"):
        _compressed_run_lengths(b"0" + b"o" * 12 + b"0", "test")
