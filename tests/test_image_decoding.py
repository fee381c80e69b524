"""Every image mode decodes to the RGB a viewer shows, or is refused naming the file; damaged and
oversized files are named too (pipeline.io.open_image and decode_image)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import PipelineError
from pipeline.io import decode_image, jpeg_damage, open_image


def saved(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def test_16_bit_greyscale_is_scaled_by_its_bit_depth(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 128, 300]], dtype=np.uint16)
    path = saved(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(open_image(path))
    # By the bit depth (x 255/65535, rounded), not by this image's own min and max.
    assert rgb[..., 0].tolist() == [[0, 1, 128], [255, 0, 1]]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_32_bit_greyscale_tiff_is_scaled_by_its_bit_depth(tmp_path):
    values = np.array([[0, 2**31 - 1], [2**24, -5]], dtype=np.int32)
    path = saved(Image.fromarray(values), tmp_path / "deep.tif")
    assert Image.open(path).mode == "I"
    # x 255/(2^32 - 1): the largest int32 is half way up; negative values are black.
    assert np.asarray(open_image(path))[..., 0].tolist() == [[0, 127], [1, 0]]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.array([[[200, 10, 10, 255], [200, 10, 10, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    path = saved(Image.fromarray(rgba, "RGBA"), tmp_path / "alpha.png")
    assert np.asarray(open_image(path)).tolist() == [[[200, 10, 10], [255, 255, 255], [127, 127, 127]]]
    grey_alpha = Image.fromarray(np.array([[[30, 255], [30, 0]]], dtype=np.uint8), "LA")
    assert np.asarray(open_image(saved(grey_alpha, tmp_path / "la.png"))).tolist() == [[[30, 30, 30], [255, 255, 255]]]


def test_palette_with_a_transparent_index_goes_through_rgba(tmp_path):
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    path = saved(palette, tmp_path / "palette.png", transparency=1)
    assert np.asarray(open_image(path)).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    opaque = saved(palette, tmp_path / "opaque.png")
    assert np.asarray(open_image(opaque)).tolist() == [[[10, 20, 30], [40, 50, 60]]]


def test_cmyk_decodes_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))  # no cyan or key: pure red
    assert np.asarray(open_image(saved(cmyk, tmp_path / "cmyk.tif"))).tolist() == [[[255, 0, 0], [255, 0, 0]]]


def test_floating_point_pixels_are_refused_by_name(tmp_path):
    path = saved(Image.fromarray(np.ones((2, 2), dtype=np.float32)), tmp_path / "float.tif")
    with pytest.raises(PipelineError, match=f"image {path} has pixel mode 'F'. Expected"):
        open_image(path)


def test_images_over_the_decompression_bomb_limit_are_named(tmp_path, monkeypatch):
    path = saved(Image.new("RGB", (20, 10)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 199)  # PIL alone would only warn up to 2x this
    with pytest.raises(PipelineError, match=f"image {path} is 20x10 = 200 pixels, over PIL's decompression-bomb limit of 199"):
        open_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 99)  # over 2x: PIL raises its own error
    with pytest.raises(PipelineError, match=f"image {path}: Image size"):
        open_image(path)
    with pytest.raises(PipelineError, match="synthetic x: Image size"):
        decode_image(path.read_bytes(), "synthetic x")


def noisy_jpeg(**options) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"restart_marker_blocks": 4}], ids=["baseline", "progressive", "restarts"])
def test_intact_jpegs_pass(options):
    assert jpeg_damage(noisy_jpeg(**options)) is None


def test_jpeg_cut_off_and_padded_with_zeros_is_named(tmp_path):
    data = noisy_jpeg()
    path = tmp_path / "padded.jpg"
    path.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    Image.open(path).load()  # what PIL alone does: decode it without a word
    with pytest.raises(PipelineError, match=f"image {path} is a damaged JPEG: the file ends inside scan data"):
        open_image(path)


def test_jpeg_with_a_lost_restart_interval_is_named():
    data = noisy_jpeg(restart_marker_blocks=4)
    first, second = data.index(b"\xff\xd0"), data.index(b"\xff\xd1")
    damaged = data[:first] + data[second:]  # the data of one interval and its marker gone
    Image.open(io.BytesIO(damaged)).load()  # PIL alone decodes it
    with pytest.raises(PipelineError, match=r"^shard x: image 3 is a damaged JPEG: restart marker 1 at byte \d+ where 0 was due"):
        decode_image(damaged, "shard x: image 3")
