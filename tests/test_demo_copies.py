"""Copy mode's defaults on random scenes no test or benchmark tuned to.

Part of the demo-quality acceptance; its seeds, floors and checks are shared in tests/demo_quality.py. Marked
slow (minutes of training): CI runs it.
"""

import json

import numpy as np
import pytest
from PIL import Image

from loratool.metrics import psnr
from tests.demo_quality import UNSEEN, image_tensor, render_lora

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("index", range(3))
def test_copy_mode_defaults_copy_unseen_scenes_in_their_own_colour_from_any_seed(index, tmp_path):
    """Copy mode with nothing but the model and a 600-step budget, on random scenes no test or benchmark tuned
    to (draw seed 4242), rendered on seeds the copy check never draws (it watches 0, 1, …): every seed renders
    the image's colour, none falls under the copy-mode issue's 18 dB (measured: 19.4 at worst, 23.1 else), and
    the copy stops once it holds. The colour is the one the demo VAE gives the image back (it bends some hues by
    up to ~30°, e.g. this orange to red): a copy can draw what the VAE can decode, no more."""
    from loratool.demo import shapes
    from loratool.train import TrainConfig, run

    image, lora = tmp_path / "scene.png", tmp_path / "copy.safetensors"
    shapes.render(shapes.scene_for(4242, index, drop_words=False)).save(image)
    run(TrainConfig(images=[image], output=lora, model="demo", steps=600))
    report = json.loads((tmp_path / "copy.report.json").read_text())
    renders = render_lora(lora, tmp_path / "renders", [0.0, 1.0], UNSEEN)
    target, hue = image_tensor(image), shapes.describe(_through_vae(image)).hue
    values = [psnr(image_tensor(renders[seed, 1.0]), target).item() for seed in UNSEEN]
    without = np.mean([psnr(image_tensor(renders[seed, 0.0]), target).item() for seed in UNSEEN])
    seen = [shapes.describe(Image.open(renders[seed, 1.0])).hue for seed in UNSEEN]
    assert all(h is not None and abs(shapes.hue_difference(hue, h)) <= 30 for h in seen), (hue, seen)
    assert np.mean(values) >= 22.0 and min(values) >= 18.0, (values, without, report["copy"]["curve"])
    assert np.mean(values) - without >= 6.0 and report["copy"]["copied"], (values, without)


def _through_vae(path):
    from diffusers import AutoencoderKL

    from loratool.demo.vae import round_trip
    from loratool.sdxl.models import DEMO_WEIGHTS

    vae = AutoencoderKL.from_pretrained(str(DEMO_WEIGHTS / "base" / "vae"))
    y = round_trip(vae, image_tensor(path)[None] * 2 - 1)[0]
    return Image.fromarray(((y.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
