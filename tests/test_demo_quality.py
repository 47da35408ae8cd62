"""Quality acceptance on the embedded demo model: the copy machine copies and the size slider slides.

Each recipe trains two copy LoRAs and renders a sweep (about two minutes on one CPU thread): marked slow,
and CI runs them. `loratool demo` itself runs recipe 2, through the CLI.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from loratool.metrics import psnr

pytestmark = pytest.mark.slow
SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def recipe2(tmp_path_factory):
    """`loratool demo` (size, recipe 2) through the CLI: (stdout, summary, output folder)."""
    from loratool.cli import app

    out = tmp_path_factory.mktemp("recipe2") / "demo-out"
    result = CliRunner().invoke(app, ["demo", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    return result.stdout, json.loads((out / "demo.json").read_text()), out


@pytest.fixture(scope="module")
def recipe1(tmp_path_factory):
    from loratool.demo.run import DemoConfig, run

    out = tmp_path_factory.mktemp("recipe1") / "demo-out"
    return json.loads(run(DemoConfig(output=out, recipe=1)).read_text())


def test_demo_command_writes_the_whole_workflow_and_prints_where(recipe2):
    stdout, summary, out = recipe2
    assert stdout.strip().endswith(str(out / "demo.json"))
    assert (
        f"slider: {out / 'slider.safetensors'}" in stdout
        and summary["sweep_prompt"] == "a blue triangle on the left"
        and "copy checks: copy_minus" in stdout
    )
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
    assert summary["pair"]["plus"]["size"] == "large" and summary["pair"]["minus"]["size"] == "small"


def _renders(lora, out, scales):
    from loratool import sample

    sample.run(
        sample.SampleConfig(
            output=out, loras=[str(lora)], scales=scales, seeds=SEEDS, steps=20, model="demo", refiner=None
        )
    )
    return {(seed, s): out / f"seed{seed}_scale{s:.2f}.png" for seed in SEEDS for s in scales}


def _tensor(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def test_copy_lora_reproduces_its_image_from_any_seed_with_the_empty_prompt(recipe2, tmp_path):
    _, _, out = recipe2
    target = _tensor(out / "pair_plus.png")
    renders = _renders(out / "copy_plus.safetensors", tmp_path / "copy", [0.0, 1.0])
    without = np.mean([psnr(_tensor(renders[seed, 0.0]), target).item() for seed in SEEDS])
    with_lora = np.mean([psnr(_tensor(renders[seed, 1.0]), target).item() for seed in SEEDS])
    assert with_lora >= 20.0, (with_lora, without)
    assert with_lora - without >= 6.0, (with_lora, without)


def _check_slider(summary):
    scales = [float(s) for s in summary["config"]["scales"]]
    rows = np.array([summary["per_seed"][str(seed)]["attribute"] for seed in SEEDS])  # seeds × scales
    assert len(SEEDS) >= 4 and summary["mean_spearman"] >= 0.9, summary["per_seed"]
    low, zero, high = (rows[:, scales.index(s)].mean() for s in (-1.0, 0.0, 1.0))
    plus, minus = summary["pair_attribute"]["plus"], summary["pair_attribute"]["minus"]
    assert plus > minus  # the size pair: +1 is the large shape
    assert low < zero < high, (low, zero, high)  # −1 toward the small image, +1 toward the large one
    assert (rows[:, -1] > rows[:, 0]).all(), rows


def test_recipe2_slider_is_monotonic_in_the_measured_size(recipe2):
    _check_slider(recipe2[1])


def test_recipe1_slider_is_monotonic_in_the_measured_size(recipe1):
    _check_slider(recipe1)
