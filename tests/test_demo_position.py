"""The place demo: its slider, and its plus half as a whole copy.

Part of the demo-quality acceptance; its seeds, floors and checks are shared in tests/demo_quality.py. Marked
slow (minutes of training): CI runs it.
"""

from pathlib import Path

import numpy as np
import pytest

from loratool.metrics import psnr
from tests.demo_quality import SEEDS, check_slider, image_tensor, render_lora, run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def position_run(tmp_path_factory):
    return run_demo(tmp_path_factory, "position")


def test_copy_lora_reproduces_its_image_from_any_seed_with_the_empty_prompt(position_run, tmp_path):
    """A half of the place slider, trained on every block: a whole copy (the size demo's halves are not)."""
    out = Path(position_run["slider"]).parent
    target = image_tensor(out / "pair_plus.png")
    renders = render_lora(out / "copy_plus.safetensors", tmp_path / "copy", [0.0, 1.0])
    without = np.mean([psnr(image_tensor(renders[seed, 0.0]), target).item() for seed in SEEDS])
    with_lora = np.mean([psnr(image_tensor(renders[seed, 1.0]), target).item() for seed in SEEDS])
    assert with_lora >= 20.0, (with_lora, without)
    assert with_lora - without >= 6.0, (with_lora, without)


def test_position_slider_glides_from_the_minus_to_the_plus_image(position_run):
    check_slider(position_run)
