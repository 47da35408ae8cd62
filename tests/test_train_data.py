import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from loratool.data.images import buckets, compare_pair, load_image, pick_bucket, prepare
from loratool.errors import InputError
from loratool.metrics import psnr, ssim


def _save(path, array, mode=None):
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)
    return path


# --- metrics: known values -------------------------------------------------------------------------


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert math.isinf(psnr(x, x).item())
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("level", [1 / 256, 1 / 16, 1 / 4])  # dyadic: exact in float32 and float64
def test_psnr_of_a_known_error_is_exact(level):
    a = torch.full((3, 16, 16), 0.5)
    noise = torch.where(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5, level, -level)
    assert psnr(a + noise, a).item() == pytest.approx(10 * math.log10(1 / level**2), abs=1e-9)


def test_ssim_of_two_flat_images_is_the_luminance_term():
    a, b = (torch.full((3, 20, 20), v, dtype=torch.float64) for v in (0.5, 0.6))
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)  # variances are 0: contrast term is c2/c2 = 1
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_of_inverted_structure_is_negative_and_batches_match_singles():
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    assert ssim(x[0], 1 - x[0]).item() < 0
    batch = ssim(x, x.flip(0))
    assert torch.allclose(batch, torch.stack([ssim(x[0], x[1]), ssim(x[1], x[0])]))


# --- images ------------------------------------------------------------------------------------------


def test_buckets_are_sdxl_multiples_of_64_near_the_target_area():
    found = buckets(1024)
    assert (1024, 1024) in found and (1344, 768) in found and (832, 1216) in found
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in found)
    assert pick_bucket(1920, 1080, 1024) == (1344, 768)
    assert buckets(64) == [(64, 64)]


def test_prepare_records_real_micro_conditioning(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "wide.png", rng.integers(0, 256, (100, 160, 3)))
    image = prepare(path, 128)
    w, h = pick_bucket(160, 100, 128)
    assert image.pixels.shape == (3, h, w)
    assert -1.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    assert image.original_size == (100, 160) and image.target_size == (h, w)
    top, left = image.crop_top_left
    assert top == 0 or left == 0  # resize-to-cover: one side fits exactly, the other is center-cropped
    assert image.time_ids() == [100, 160, top, left, h, w]


def test_alpha_is_flattened_on_white_and_grayscale_expanded(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)  # fully transparent black
    rgba[:, :32, 3] = 255  # left half opaque black
    img = load_image(_save(tmp_path / "a.png", rgba, "RGBA"))
    arr = np.asarray(img)
    assert img.mode == "RGB" and (arr[:, :32] == 0).all() and (arr[:, 32:] == 255).all()
    gray = load_image(_save(tmp_path / "g.png", np.full((64, 64), 90), "L"))
    assert gray.mode == "RGB" and (np.asarray(gray) == 90).all()


def test_16_bit_grayscale_is_scaled_not_clipped_to_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # what made convert("RGB") clip
    arr = np.asarray(load_image(tmp_path / "g16.png")).astype(int)
    assert (arr[..., 0] == arr[..., 2]).all() and arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert np.abs(arr[0, :, 0] - np.round(ramp[0] / 257)).max() == 0


def test_palette_images_keep_their_colours_and_flatten_transparency_on_white(tmp_path):
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[:, :32] = (200, 30, 60)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    arr = np.asarray(load_image(tmp_path / "p.png"))
    assert (arr[:, :32] == (200, 30, 60)).all() and (arr[:, 32:] == 0).all()
    pal = Image.open(tmp_path / "p.png")
    black = next(i for i, c in enumerate(np.asarray(pal.getpalette()).reshape(-1, 3)) if not c.any())
    pal.save(tmp_path / "pt.png", transparency=black)  # black is transparent → white
    arr = np.asarray(load_image(tmp_path / "pt.png"))
    assert (arr[:, :32] == (200, 30, 60)).all() and (arr[:, 32:] == 255).all()


@pytest.mark.parametrize("case", ["missing", "text", "small"])
def test_bad_images_are_rejected_naming_the_file(tmp_path, case):
    path = tmp_path / f"{case}.png"
    if case == "text":
        path.write_text("not an image")
    elif case == "small":
        _save(path, np.zeros((63, 200, 3)))
    with pytest.raises(InputError, match=case):
        load_image(path)


def test_pair_reports_difference_and_warns_when_most_pixels_differ(tmp_path, caplog):
    a = np.zeros((64, 80, 3))
    b = a.copy()
    b[10:20, 30:35] = 255
    diff = compare_pair(_save(tmp_path / "a.png", a), _save(tmp_path / "b.png", b))
    assert diff.share == pytest.approx(50 / (64 * 80)) and diff.bbox == (30, 10, 35, 20)
    with caplog.at_level(logging.WARNING):
        compare_pair(tmp_path / "a.png", _save(tmp_path / "c.png", np.full((64, 80, 3), 9)))
    assert "differ" in caplog.text
    with pytest.raises(InputError, match="same size"):
        compare_pair(tmp_path / "a.png", _save(tmp_path / "d.png", np.zeros((64, 64, 3))))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-720, 720), st.floats(-720, 720))
def test_turning_the_hue_is_a_rotation_of_the_wheel_that_keeps_saturation_and_value(seed, a, b):
    """`--vary hue`: the turns of a pair's images. Turns add up, a whole turn changes nothing, greys stay grey,
    and each pixel keeps its saturation and value (its brightest channel)."""
    from loratool.data.images import turn_hue

    pixels = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    pixels[:, 0, :] = pixels[0, 0, :]  # a grey row
    turned = turn_hue(pixels, a)
    assert torch.allclose(turn_hue(turned, b), turn_hue(pixels, a + b), atol=1e-4)
    assert torch.allclose(turn_hue(pixels, 360.0), pixels, atol=1e-5)
    assert torch.allclose(turned[:, 0, :], pixels[:, 0, :], atol=1e-6)
    x, y = (pixels + 1) / 2, (turned + 1) / 2
    assert torch.allclose(y.amax(0), x.amax(0), atol=1e-5)  # value
    assert torch.allclose(y.amax(0) - y.amin(0), x.amax(0) - x.amin(0), atol=1e-5)  # chroma, so saturation


def test_a_third_of_a_turn_takes_red_to_green_and_green_to_blue():
    from loratool.data.images import turn_hue

    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    assert torch.equal(turn_hue(red, 120.0), torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1))
    assert torch.equal(turn_hue(red, 240.0), torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1))
