"""examples/ run as a user would run them, with few steps (STEPS, SAMPLE_STEPS) on the demo model."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loratool.options import read_toml, settings
from loratool.train.config import DreamboothConfig, TrainConfig

EXAMPLES = Path(__file__).parents[1] / "examples"
FAST = {"STEPS": "2", "SAMPLE_STEPS": "2"}


def _env() -> dict:
    root = str(Path(__file__).parents[1])
    return (
        os.environ
        | FAST
        | {
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
            "PYTHON": sys.executable,
            "LORATOOL": f"{sys.executable} -m loratool",
            "HF_HUB_OFFLINE": "1",
        }
    )


def test_slider_demo_script(tmp_path):
    result = subprocess.run(
        ["bash", str(EXAMPLES / "slider_demo.sh"), str(tmp_path)], env=_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model: demo (recorded in size_a.safetensors)" in result.stderr  # merge and sample read it back
    assert (tmp_path / "sweep" / "sheet.png").is_file() and (tmp_path / "sweep" / "sweep.json").is_file()
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["lora_start"]["base_steps_off"] == 0


def test_slider_api_example(tmp_path, monkeypatch):
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    sys.path.insert(0, str(EXAMPLES))
    try:
        import slider_api
    finally:
        sys.path.remove(str(EXAMPLES))
    written = slider_api.main(tmp_path, steps=2, sample_steps=2)
    assert tmp_path / "sweep" / "sheet.png" in written
    logging.getLogger().handlers.clear()


def test_the_api_example_writes_only_its_results_and_its_own_progress(tmp_path):
    """Run as a program (`libraries.quiet()` first, as the CLI does): stdout is the files written, and stderr
    holds the progress bars but no other library's warnings (torchvision image processors, bitsandbytes)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "slider_api.py"), str(tmp_path)], env=_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(tmp_path / "sweep" / "sheet.png") in result.stdout.splitlines()
    chatter = [line for line in result.stderr.splitlines() if line.strip() and "━" not in line]
    assert not chatter, chatter


def test_copy_sdxl_toml_is_a_valid_train_config():
    path = EXAMPLES / "copy_sdxl.toml"
    values = settings(TrainConfig, {}, read_toml(path), path, mode=("copy", (TrainConfig, DreamboothConfig)))
    config = TrainConfig(**values)
    assert config.pair and [p.name for p in config.lora_paths()] == ["head_a.safetensors", "head_b.safetensors"]


@pytest.mark.parametrize("script", ["slider_demo.sh", "slider_api.py"])
def test_examples_say_how_to_run_them_fast(script):
    assert "STEPS=20" in (EXAMPLES / script).read_text()
