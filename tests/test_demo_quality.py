"""Quality acceptance on the embedded demo model (v2): copies copy, and sliders slide for size, colour and place.

Each concept trains two copy LoRAs on its pair and sweeps the merged slider (about two minutes on one CPU
thread): marked slow, and CI runs them, each run an xdist group of its own so the suite's two workers share
them. The size run goes through the `loratool demo` CLI. The figures are what `loratool.demo.evaluation`
measures; the closing notes of the demo issues give them over 8 seeds.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from loratool.metrics import psnr

pytestmark = pytest.mark.slow
SEEDS = [0, 1, 2, 3]
UNSEEN = [100, 101, 102, 103]  # seeds no copy check renders
# Floors under what the shipped lab (v2 fine-tuned with decoys) measures on these 4 seeds (8-seed figures are
# in datasets/README.md). The aims of the demo-v2 issue (Spearman 0.95, largest jump 0.5, kept 0.9) are not
# all met yet: these floors catch a regression to v1's switches (largest jump 0.73-0.90 on the same pairs),
# not the aim. Place gets its own ceiling: a place slider flips each seed's square from one side to the other
# at one scale (a 17-scale sweep shows the flip inside one 0.125 step; datasets/README.md), so its largest
# jump on 4 seeds is 0.76 here, 0.68 on v2.
FLOORS = {"mean_spearman": 0.7, "span": 0.5}
MAX_GLIDE = {"size": 0.72, "colour": 0.72, "position": 0.8}
# Size trains its halves on the mid and up blocks with hue varied, which keeps the scene on 0.69 of these
# renders (halves on every block, which drag hue or shape along: 0.31); colour is swept from a quarter in (1.0).
KEPT = {"size": 0.5, "colour": 0.85, "position": 0.5}


@pytest.fixture(scope="module")
def size_run(tmp_path_factory):
    """`loratool demo` (size, recipe 2) through the CLI: (stdout, summary, output folder)."""
    from loratool.cli import app

    out = tmp_path_factory.mktemp("size") / "demo-out"
    result = CliRunner().invoke(app, ["demo", "-o", str(out)])
    logging.getLogger().handlers.clear()  # the CLI's handler wrote to CliRunner's stderr, closed now
    assert result.exit_code == 0, result.stderr
    return result.stdout, json.loads((out / "demo.json").read_text()), out


def _demo(tmp_path_factory, concept):
    from loratool.demo.run import DemoConfig, run

    out = tmp_path_factory.mktemp(concept) / "demo-out"
    return json.loads(run(DemoConfig(output=out, concept=concept, seeds=SEEDS)).read_text())


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    return _demo(tmp_path_factory, "colour")


@pytest.fixture(scope="module")
def position_run(tmp_path_factory):
    return _demo(tmp_path_factory, "position")


@pytest.mark.xdist_group("demo-size")
def test_demo_command_writes_the_whole_workflow_and_prints_where(size_run):
    stdout, summary, out = size_run
    assert stdout.strip().endswith(str(out / "demo.json"))
    assert f"slider: {out / 'slider.safetensors'}" in stdout and "copy checks: copy_minus" in stdout
    assert "size vs scale over 4 seeds: mean Spearman" in stdout
    assert "off for the first" not in stdout  # the size demo sweeps from the first step
    assert "trained on the mid and up blocks with hue varied" in stdout and "not to be whole copies" in stdout
    assert set(summary["copy_psnr_db"]) == {"copy_minus", "copy_plus"}
    for name in (
        "pair_plus.png",
        "pair_minus.png",
        "copy_plus.safetensors",
        "copy_minus.safetensors",
        "copy_plus.preview.png",
        "slider.safetensors",
        "sweep/sheet.png",
        "sweep/sweep.json",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "sweep").glob("*.gif")) == [f"sweep-seed{s}.gif" for s in SEEDS]
    minus, plus = summary["pair"]["minus"], summary["pair"]["plus"]
    assert minus["radius"] != plus["radius"] and {k: v for k, v in minus.items() if k != "radius"} == {
        k: v for k, v in plus.items() if k != "radius"
    }
    words = set(summary["sweep_prompt"].split())
    assert not words & {"small", "large"} and minus["shape"] in words  # swept in a prompt without the concept
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    assert sweep["summary"]["mean_glide"] is not None  # the generic metrics of every sweep


def _renders(lora, out, scales, seeds=SEEDS):
    from loratool import sample

    sample.run(
        sample.SampleConfig(
            output=out, loras=[str(lora)], scales=scales, seeds=seeds, steps=20, model="demo", refiner=None
        )
    )
    return {(seed, s): out / f"seed{seed}_scale{s:.2f}.png" for seed in seeds for s in scales}


def _tensor(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.mark.xdist_group("demo-position")
def test_copy_lora_reproduces_its_image_from_any_seed_with_the_empty_prompt(position_run, tmp_path):
    """A half of the place slider, trained on every block: a whole copy (the size demo's halves are not)."""
    out = Path(position_run["slider"]).parent
    target = _tensor(out / "pair_plus.png")
    renders = _renders(out / "copy_plus.safetensors", tmp_path / "copy", [0.0, 1.0])
    without = np.mean([psnr(_tensor(renders[seed, 0.0]), target).item() for seed in SEEDS])
    with_lora = np.mean([psnr(_tensor(renders[seed, 1.0]), target).item() for seed in SEEDS])
    assert with_lora >= 20.0, (with_lora, without)
    assert with_lora - without >= 6.0, (with_lora, without)


@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.xdist_group(f"copy-{i}")) for i in range(3)])
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
    renders = _renders(lora, tmp_path / "renders", [0.0, 1.0], UNSEEN)
    target, hue = _tensor(image), shapes.describe(_through_vae(image)).hue
    values = [psnr(_tensor(renders[seed, 1.0]), target).item() for seed in UNSEEN]
    without = np.mean([psnr(_tensor(renders[seed, 0.0]), target).item() for seed in UNSEEN])
    seen = [shapes.describe(Image.open(renders[seed, 1.0])).hue for seed in UNSEEN]
    assert all(h is not None and abs(shapes.hue_difference(hue, h)) <= 30 for h in seen), (hue, seen)
    assert np.mean(values) >= 22.0 and min(values) >= 18.0, (values, without, report["copy"]["curve"])
    assert np.mean(values) - without >= 6.0 and report["copy"]["copied"], (values, without)


def _through_vae(path):
    from diffusers import AutoencoderKL

    from loratool.demo.vae import round_trip
    from loratool.sdxl.models import DEMO_WEIGHTS

    vae = AutoencoderKL.from_pretrained(str(DEMO_WEIGHTS / "base" / "vae"))
    y = round_trip(vae, _tensor(path)[None] * 2 - 1)[0]
    return Image.fromarray(((y.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())


def _check_slider(summary):
    quality = summary["slider_quality"]
    got = quality["summary"]
    print(summary["config"]["concept"], got)  # the figures, for the record (pytest -s)
    for key, floor in FLOORS.items():
        assert got[key] >= floor, (key, got, quality["per_seed"])
    assert got["mean_glide"] <= MAX_GLIDE[summary["config"]["concept"]], (got, quality["per_seed"])
    assert got["kept"] >= KEPT[summary["config"]["concept"]], (got, quality["per_seed"])
    progress = np.array([row["progress"] for row in quality["per_seed"].values()])  # seeds × scales (sorted)
    assert (progress[:, -1] > progress[:, 0]).all(), progress  # +1 nearer the plus image on every seed


@pytest.mark.xdist_group("demo-size")
def test_size_slider_glides_from_the_minus_to_the_plus_image(size_run):
    _check_slider(size_run[1])


def _swept_from_the_start(summary: dict, out) -> dict:
    """The demo's slider swept again as the demo swept it, but with --lora-start 0; its summary."""
    from loratool import sample
    from loratool.demo.run import DemoConfig, measure_sweep

    recorded = summary["config"]
    config = DemoConfig(output=out, concept=recorded["concept"], seeds=SEEDS, pair_seed=recorded["pair_seed"])
    sample.run(
        sample.SampleConfig(
            output=out, loras=[summary["slider"]], prompt=summary["sweep_prompt"], scales=config.scales,
            seeds=SEEDS, steps=config.sample_steps, model="demo", refiner="demo", lora_start=0.0,
        )
    )  # fmt: skip
    pair = (summary["pair_attribute"]["minus"], summary["pair_attribute"]["plus"])
    return measure_sweep(config, out, pair)["summary"]


@pytest.mark.xdist_group("demo-colour")
def test_the_colour_demo_starts_its_slider_late_and_follows_the_pair_at_least_as_well(colour_run, tmp_path):
    """The colour demo sweeps with --lora-start 0.25 by default: the base lays the scene out, the slider changes
    the hue. On the demo pair, against the same slider swept from the first step, 4 seeds: Spearman 1.0 instead
    of 0.95, kept 1.0 as before, span 0.70 instead of 0.93."""
    assert colour_run["config"]["lora_start"] == 0.25
    got, early = colour_run["slider_quality"]["summary"], _swept_from_the_start(colour_run, tmp_path / "early")
    assert got["mean_spearman"] >= early["mean_spearman"] and got["kept"] >= early["kept"], (got, early)
    assert got["span"] >= 0.5, got


@pytest.mark.xdist_group("demo-colour-held-out")
def test_a_late_start_keeps_the_scene_on_a_colour_pair_no_choice_was_made_on(tmp_path_factory):
    """The same on the colour pair of seed 3 (a small triangle on the left), measured only after the default was
    chosen on the pairs of seeds 0-2. From the first step the slider also moves or redraws the triangle. On these
    4 seeds: kept 1.0 instead of 0.5, Spearman 0.9 as before, span 1.04 instead of 1.11 (8 seeds: kept 1.0
    instead of 0.69, Spearman 0.93 instead of 0.90, span 0.96 instead of 1.05)."""
    from loratool.demo.run import DemoConfig, run

    out = tmp_path_factory.mktemp("held-out")
    config = DemoConfig(output=out / "demo", concept="colour", seeds=SEEDS, pair_seed=3)
    summary = json.loads(run(config).read_text())
    got, early = summary["slider_quality"]["summary"], _swept_from_the_start(summary, out / "early")
    print("held-out colour", got, early)  # the figures, for the record (pytest -s)
    assert got["kept"] >= 0.85 and got["kept"] >= early["kept"] + 0.15, (got, early)
    assert got["mean_spearman"] >= 0.85 and got["span"] >= 0.5, got


@pytest.mark.xdist_group("demo-size-held-out")
def test_size_halves_keep_the_scene_on_a_size_pair_no_choice_was_made_on(tmp_path_factory):
    """The size demo's halves (mid and up blocks, hue varied) on the size pair of seed 8 (a green triangle on
    the right), drawn after the setting was chosen on the pairs of seeds 0-5 and checked on 6-7. On these 4
    seeds: Spearman 0.90, largest jump 0.55, span 1.08, kept 0.81; halves on every block: 0.975 / 0.61 / 1.44 /
    0.69 (they tint the small triangles teal)."""
    from loratool.demo.run import DemoConfig, run

    config = DemoConfig(output=tmp_path_factory.mktemp("size-held-out") / "demo", concept="size", seeds=SEEDS,
                        pair_seed=8)  # fmt: skip
    summary = json.loads(run(config).read_text())
    assert summary["config"]["blocks"] == ["mid", "up"] and summary["config"]["vary"] == ["hue"]
    _check_slider(summary)
    assert summary["slider_quality"]["summary"]["kept"] >= 0.75, summary["slider_quality"]


@pytest.mark.xdist_group("demo-colour")
def test_colour_slider_glides_from_the_minus_to_the_plus_image(colour_run):
    _check_slider(colour_run)


@pytest.mark.xdist_group("demo-position")
def test_position_slider_glides_from_the_minus_to_the_plus_image(position_run):
    _check_slider(position_run)


@pytest.mark.xdist_group("demo-recipe1")
def test_recipe1_trains_the_plus_copy_on_the_minus_copy_folded_in(tmp_path):
    """Recipe 1 end to end with few steps: the slider is the plus copy trained on top of the minus copy. The
    sweep runs with --lora-start, which reaches `sample` and is said where the demo says what it swept."""
    from safetensors import safe_open

    from loratool.demo.run import DemoConfig, describe, run

    config = DemoConfig(output=tmp_path / "r1", recipe=1, steps=20, seeds=[0], lora_start=0.25)
    path = run(config)
    summary = json.loads(path.read_text())
    with safe_open(tmp_path / "r1" / "slider.safetensors", "pt") as f:
        meta = f.metadata()
    assert "copy_minus.safetensors" in json.dumps(meta)  # the folded-in base LoRA is recorded
    assert summary["slider_quality"]["per_seed"]["0"]["progress"]
    sweep = json.loads((tmp_path / "r1" / "sweep" / "sweep.json").read_text())
    assert sweep["lora_start"] == {"fraction": 0.25, "base_steps_off": 4}  # 20 steps, the base does 16
    assert any("off for the first 0.25 of the base steps" in line for line in describe(path))
