"""Options declared once: every config field has one CLI option with the field's default, `--config` files
(TOML or an output's recorded config) feed the same fields, and a flag of another train mode is an error."""

import json
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from safetensors.torch import load_file

from loratool import merge, sample, train
from loratool.cli import app
from loratool.demo.run import DemoConfig
from loratool.merge import MergeConfig
from loratool.options import KEY, declared
from loratool.sample.config import SampleConfig
from loratool.train.config import DreamboothConfig, TrainConfig

# Fields set by something other than their own option: positional arguments, --pair, --mode,
# --slider/--points/--values, and the Python-API-only sample switch.
NOT_OPTIONS = {
    "train": {"images", "pair", "mode"},
    "sample": {"scales", "switch"},
    "merge": {"inputs", "extra"},
    # the demo's fixed recipe settings (a lab, not a tool): Python API only
    "demo": {"scales", "rank", "sample_steps"},
}
CLASSES = {
    "train": (TrainConfig, DreamboothConfig),
    "sample": (SampleConfig,),
    "merge": (MergeConfig,),
    "demo": (DemoConfig,),
}


def _params(verb: str) -> dict:
    command = typer.main.get_command(app).commands[verb]
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("verb", ["train", "sample", "merge", "demo"])
def test_every_field_has_exactly_one_option_with_the_fields_default(verb):
    params = _params(verb)
    for cls in CLASSES[verb]:
        for f in fields(cls):
            if f.name in NOT_OPTIONS[verb]:
                assert KEY not in f.metadata, f.name
                continue
            assert f.name in params, f"{cls.__name__}.{f.name} has no option"
            flags = [o for o in params[f.name].opts + params[f.name].secondary_opts if o.startswith("--")]
            assert len(flags) == len(set(flags)) and sum(p.name == f.name for p in params.values()) == 1
    for name, (f, _, _) in declared(*CLASSES[verb]).items():
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        shown = params[name].default
        if isinstance(default, list | tuple) and isinstance(shown, str):  # --seeds 0, --crop 0,0, --blocks down,mid,up
            shown, default = shown.split(","), [str(v) for v in default]
        assert shown == (None if default in (MISSING, []) else default), name


def test_the_defaults_are_declared_once():
    source = (Path(__file__).parents[1] / "loratool" / "cli.py").read_text()
    assert "stabilityai/" not in source and "= 8" not in source


@pytest.fixture
def captured(monkeypatch):
    """Replace each verb's run with one that keeps the config it was given."""
    seen = {}

    def keep(config):
        seen["config"] = config
        return []

    for verb in (train, sample):
        monkeypatch.setattr(verb, "run", keep)
    monkeypatch.setattr(merge, "run", lambda config: keep(config) or "out")
    return seen


def test_no_flags_give_the_configs_own_defaults(cli, captured, tmp_path):
    assert cli("train", "a.png")[0] == 0
    assert captured["config"] == TrainConfig(images=[Path("a.png")])
    assert cli("sample")[0] == 0
    assert captured["config"] == SampleConfig()
    assert cli("merge", "a.safetensors", "-o", "m.safetensors")[0] == 0
    assert captured["config"] == MergeConfig(inputs=["a.safetensors"], output=Path("m.safetensors"))


def test_a_toml_config_is_read_and_flags_override_it(cli, captured, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('images = ["a.png"]\nrank = 4\nsteps = 50\nbase_loras = []\n')
    assert cli("train", "--config", toml, "--steps", "60")[0] == 0
    assert (captured["config"].rank, captured["config"].steps) == (4, 60)
    toml.write_text('seeds = [1, 2]\ncrop = [0, 32]\nprompt = "a fox"\n')
    assert cli("sample", "--config", toml, "--seed", "3")[0] == 0
    assert (captured["config"].seeds, captured["config"].crop, captured["config"].prompt) == ([3], (0, 32), "a fox")


@pytest.mark.parametrize(
    "toml, args, message",
    [
        ("ranks = 4\n", ["train", "a.png"], "unknown key 'ranks'"),
        ("rank = 'four'\n", ["train", "a.png"], "rank = 'four' should be int"),
        ("prompt = 'sks'\n", ["train", "a.png"], "prompt (in "),
        (
            "",
            ["train", "a.png", "--prompt", "sks"],
            "--prompt is a dreambooth-mode option; it does not apply to --mode copy",
        ),
        ("", ["train", "d/", "--mode", "dreambooth", "--check-seeds", "3"], "--check-seeds is a copy and slider-mode"),
        ("", ["train", "d/", "--mode", "dreambooth", "--no-stop-when-copied"], "--stop-when-copied is a copy and"),
        ("", ["train", "--mode", "wrong", "--class-dir", "c"], None),  # dreambooth and wrong share it
        ("", ["train", "--mode", "wrong", "--prompt", "x"], "--prompt is a dreambooth-mode option"),
        ("mode = 'wrong'\n", ["train", "--num-class-images", "3", "--pure-noise", "0.1"], "--pure-noise is a copy"),
        ("steps = 2\n", ["merge", "a.safetensors", "-o", "m.safetensors"], "unknown key 'steps'"),
        ("", ["merge", "a.safetensors"], "--output is required"),
    ],
)
def test_a_setting_that_does_not_apply_is_one_line_naming_it(cli, captured, tmp_path, toml, args, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    code, _, err = cli(*args, "--config", path)
    if message is None:
        assert code == 0, err
        return
    assert code == 1 and message in err and err.count("\n") == 1, err
    if "(in " in message or "unknown" in message:
        assert str(path) in err


@pytest.fixture(scope="module")
def copy_lora(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("copy")
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(folder / "img.png")
    config = TrainConfig(
        images=[folder / "img.png"],
        output=folder / "copy.safetensors",
        model=str(tiny_models / "base"),
        **dict(resolution=64, rank=4, lr=1e-3, steps=3, check_every=0, seed=7),
    )
    train.run(config)
    return config.output


def test_a_train_run_reproduced_from_its_own_metadata_gives_the_identical_lora(copy_lora, cli, tmp_path):
    again = tmp_path / "again.safetensors"
    code, _, err = cli("train", "--config", copy_lora, "-o", again)
    assert code == 0, err
    first, second = load_file(copy_lora), load_file(again)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)


def test_a_record_from_before_a_setting_existed_reproduces_as_it_trained_not_with_todays_default(tmp_path):
    """A copy's report written before --multires-noise trained without it; today a copy defaults to 0.5."""
    from loratool.recorded import config_file

    old, new = tmp_path / "old.report.json", tmp_path / "new.report.json"
    old.write_text(json.dumps({"settings": {"images": ["a.png"], "rank": 4}}))
    new.write_text(json.dumps({"settings": {"images": ["a.png"], "multires_noise": 0.5}}))
    assert TrainConfig(**config_file(old, "train")).multires_noise == 0.0
    assert TrainConfig(**config_file(new, "train")).multires_noise == 0.5
    assert TrainConfig(images=["a.png"]).multires_noise == 0.5
    toml = tmp_path / "mine.toml"  # a hand-written file asks for today's defaults
    toml.write_text('images = ["a.png"]\n')
    assert TrainConfig(**config_file(toml, "train")).multires_noise == 0.5


def test_the_recorded_base_model_is_the_default_model(copy_lora, tiny_models, cli, captured, tmp_path):
    base = str(tiny_models / "base")
    code, out, err = cli("inspect", copy_lora)
    assert code == 0 and f"model: {base} (recorded in copy.safetensors)" in err
    assert f"matches_model: {base}" in out
    assert cli("sample", "--lora", f"{copy_lora}:0.5")[0] == 0
    assert captured["config"].model == base
    assert cli("sample", "--lora", copy_lora, "--model", "other")[0] == 0  # explicit --model wins
    assert captured["config"].model == "other"
    assert cli("merge", f"{copy_lora}:-1", "-o", tmp_path / "m.safetensors")[0] == 0
    assert captured["config"].model == base


def test_a_merge_records_its_base_model_and_reproduces(copy_lora, tiny_models, cli, tmp_path):
    from loratool.recorded import base_model

    out = tmp_path / "neg.safetensors"
    assert cli("merge", f"{copy_lora}:-1", "-o", out)[0] == 0
    assert base_model(out) == str(tiny_models / "base")
    again = tmp_path / "again.safetensors"
    code, _, err = cli("merge", "--config", out, "-o", again)
    assert code == 0, err
    first, second = load_file(out), load_file(again)
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)
