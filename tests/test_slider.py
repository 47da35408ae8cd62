"""Recipe 3 (train --mode slider), LoCon training (--conv-rank), --blocks and --vary, the demo's per-recipe
settings, and strength calibration (merge --calibrate). The text slider (recipe 4) is in test_text_slider.py."""

import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from loratool.files import sha256
from loratool.sdxl.index import model_index, read
from loratool.train import SliderConfig, TrainConfig, run
from loratool.train import loop as train_loop


def _flat(path, value, size=64):
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return _flat(root / "light.png", 235), _flat(root / "dark.png", 20)


def test_slider_mode_writes_one_slider_the_reader_accepts(tiny_models, pair, tmp_path, cli):
    out = tmp_path / "slider.safetensors"
    args = ["train", "--mode", "slider", "--pair", *pair, "--model", tiny_models / "base", "-o", out]
    code, stdout, stderr = cli(*args, "--steps", "4", "--rank", "4", "--check-every", "2", "--check-seeds", "1")
    assert code == 0, stderr
    assert stdout.split()[0] == str(out) and not list(tmp_path.glob("slider_*"))  # one file, not a pair of copies
    lora = read(out, model_index(str(tiny_models / "base")))
    assert len(lora.network) > 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["loratool_slider"] == "true" and meta["loratool_mode"] == "slider"
    recorded = json.loads(meta["loratool_pair"])
    assert [(p["file"], p["sha256"], p["scale"]) for p in recorded] == [
        (pair[0].name, sha256(pair[0]), 1.0),
        (pair[1].name, sha256(pair[1]), -1.0),
    ]
    report = json.loads(out.with_name("slider.report.json").read_text())
    check = report["copy_checks"][-1]
    assert len(check["psnr"]) == 2 and {"plus", "minus"} <= check.keys()  # +1 vs A and −1 vs B
    assert report["settings"]["resolution"] == 64 and report["copy"]["stopped_because"] == "budget"


def test_both_halves_of_a_step_see_the_same_noise_at_opposite_scales(tiny_models, pair, tmp_path, monkeypatch):
    seen = []
    real = train_loop.sample_losses

    def spy(unet, sched, batch, generator, *args, **kwargs):
        layer = next(m for m in unet.modules() if hasattr(m, "scaling") and train_loop.ADAPTER in m.scaling)
        sign = layer.scaling[train_loop.ADAPTER] / (layer.lora_alpha[train_loop.ADAPTER] / layer.r[train_loop.ADAPTER])
        if kwargs.get("timestep") is None:  # a training draw, not the fixed eval loss
            seen.append((generator.get_state().clone(), sign, batch.latents.clone()))
        return real(unet, sched, batch, generator, *args, **kwargs)

    monkeypatch.setattr(train_loop, "sample_losses", spy)
    run(SliderConfig(images=list(pair), model=str(tiny_models / "base"), output=tmp_path / "s", steps=2, check_every=0))
    steps = [seen[0:2], seen[2:4]]
    assert len(seen) == 4
    for (state_a, sign_a, latent_a), (state_b, sign_b, latent_b) in steps:
        assert torch.equal(state_a, state_b) and (sign_a, sign_b) == (1.0, -1.0)
        assert not torch.equal(latent_a, latent_b)
    assert not torch.equal(steps[0][0][0], steps[1][0][0])  # a new draw each step


def test_the_slider_goes_to_a_at_plus_one_and_to_b_at_minus_one(tmp_path):
    """On the embedded demo model (a tiny VAE built at random cannot tell two images apart): a light/dark pair,
    a high lr and 60 steps. Direction with a margin, not values."""
    from loratool.data.images import prepare
    from loratool.lora.apply import add_adapter, set_scale
    from loratool.metrics import psnr
    from loratool.sdxl.index import ModelIndex
    from loratool.sdxl.models import load_pipeline, pick_runtime
    from loratool.train.check import CopyChecker
    from loratool.train.conditioning import encode_once

    a, b = _flat(tmp_path / "a.png", 235, 128), _flat(tmp_path / "b.png", 20, 128)
    out = tmp_path / "slider.safetensors"
    run(SliderConfig(images=[a, b], model="demo", output=out, steps=60, lr=5e-3, rank=4, alpha=4, check_every=0))
    pipe = load_pipeline("demo", pick_runtime(None, "fp32"))
    lora = read(out, ModelIndex.of_pipeline(pipe))
    images = [prepare(p, 128) for p in (a, b)]
    encoded = [encode_once(pipe, i) for i in images]
    add_adapter(pipe.unet, lora.network, "unet", "s")
    checker = CopyChecker.of(pipe.vae, pipe.scheduler.config, encoded[0], images[0].pixels, 2, 8)
    refs = [((i.pixels[None] + 1) / 2).clamp(0, 1) for i in images]
    score = {}
    for scale in (1.0, -1.0):
        set_scale(pipe.unet, "s", scale)
        renders = torch.cat([checker.denoise(pipe.unet, seed) for seed in (0, 1)])
        score[scale] = [float(psnr(renders, r.expand_as(renders)).mean()) for r in refs]
    assert score[1.0][0] > score[-1.0][0] + 2, score  # +1 is much closer to A than −1 is (v2 model: 22.1 vs 19.3)
    # measured 0.87 vs 0.71 dB: B is near black, so PSNR against it is small; the −1 end learns more slowly
    assert score[-1.0][1] > score[1.0][1] + 0.15, score  # −1 is closer to B than +1 is


def test_locon_training_writes_3x3_modules_that_diffusers_loads(tiny_models, pair, tmp_path, caplog):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "locon.safetensors"
    model = str(tiny_models / "base")
    run(TrainConfig(images=[pair[0]], model=model, output=out, steps=2, check_every=0, conv_rank=2, conv_alpha=1.0))
    network = read(out, model_index(str(tiny_models / "base"))).network
    convs = [m for m in network if m.is_conv and tuple(m.down.shape[2:]) == (3, 3)]
    assert convs and {m.rank for m in convs} == {2} and {m.alpha for m in convs} == {1.0}
    assert {m.rank for m in network if m not in convs} == {8}  # the linears keep --rank
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(out), adapter_name="locon")
    assert not [
        r for r in caplog.records if re.search(r"unexpected keys|missing keys|not loaded", r.getMessage(), re.I)
    ]
    loaded = sum(1 for _, m in pipe.unet.named_modules() if "locon" in getattr(m, "lora_A", {}))
    assert loaded == len(network)


def test_blocks_up_trains_loras_on_the_up_blocks_only(tiny_models, pair, tmp_path):
    from diffusers import UNet2DConditionModel

    from loratool.lora.targets import unet_targets

    out = tmp_path / "up.safetensors"
    model = str(tiny_models / "base")
    run(TrainConfig(images=[pair[0]], model=model, output=out, steps=2, check_every=0, conv_rank=0, blocks="up"))
    paths = sorted(m.path for m in read(out, model_index(model)).network)
    every = unet_targets(UNet2DConditionModel.from_pretrained(tiny_models / "base" / "unet"))
    assert paths == [t for t in every if t.startswith("up_blocks.")] and len(paths) < len(every)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["loratool_config"])["blocks"] == ["up"]


def _square(path, half):
    pixels = np.full((64, 64, 3), 255, np.uint8)
    pixels[32 - half : 32 + half, 32 - half : 32 + half] = (220, 60, 30)
    Image.fromarray(pixels).save(path)
    return path


def test_vary_hue_trains_each_half_on_its_image_and_seven_turns_of_it(tiny_models, tmp_path):
    """The same eight turns of the wheel (0 first: the image itself) for both halves; recorded."""
    from dataclasses import replace

    from loratool.train import copy_machine

    images = [_square(tmp_path / "large.png", 20), _square(tmp_path / "small.png", 8)]
    config = TrainConfig(images=images, pair=True, vary="hue", model=str(tiny_models / "base"),
                         output=tmp_path / "half", steps=2, check_every=0)  # fmt: skip
    latents = [b.latents for b in copy_machine.load_trainee(config, images[0]).source.batches]
    plain = copy_machine.load_trainee(replace(config, vary=[]), images[0]).source.batch.latents
    assert len(latents) == 8 and torch.equal(latents[0], plain)
    assert all(not torch.allclose(a, b, atol=1e-3) for i, a in enumerate(latents) for b in latents[i + 1 :])
    run(config)
    for path in config.lora_paths():
        with safe_open(str(path), "pt") as f:
            assert json.loads(f.metadata()["loratool_config"])["vary"] == ["hue"]


def test_vary_is_a_copy_mode_option_and_varies_hue_only():
    from loratool.errors import InputError

    assert TrainConfig(images=["a.png"], vary="hue").vary == ["hue"]  # one half at a time: the same turns
    with pytest.raises(InputError, match="--vary is for copy mode's halves of a slider"):
        SliderConfig(images=["a.png", "b.png"], vary="hue")
    with pytest.raises(InputError, match="--vary takes hue, not size"):
        TrainConfig(images=["a.png", "b.png"], pair=True, vary="size")


def test_conv_alpha_needs_conv_rank():
    from loratool.errors import InputError

    with pytest.raises(InputError, match="--conv-alpha needs --conv-rank"):
        TrainConfig(images=["a.png"], conv_rank=0, conv_alpha=4.0)
    with pytest.raises(InputError, match="--conv-alpha needs --conv-rank"):  # a pair's copies: no convs by default
        TrainConfig(images=["a.png", "b.png"], pair=True, conv_alpha=4.0)
    assert TrainConfig(images=["a.png"], conv_alpha=2.0).conv_rank == 4  # a copy of one image has them


@pytest.fixture(scope="module")
def copy_slider(tiny_models, pair, tmp_path_factory):
    """A copy standing in for a slider, so trained as a slider's half is: no convs, no multi-resolution noise."""
    out = tmp_path_factory.mktemp("cal") / "copy.safetensors"
    settings = dict(check_every=0, steps=10, rank=4, lr=1e-2, conv_rank=0, multires_noise=0.0)
    run(TrainConfig(images=[pair[0]], model=str(tiny_models / "base"), output=out, **settings))
    return out


def _change_at_one(tiny_models, path) -> float:
    from loratool.calibrate import Sweep, pipeline_with

    model = str(tiny_models / "base")
    return Sweep(pipeline_with(model, read(path, model_index(model)).network), "", 64).change(1.0)


def test_calibration_puts_the_change_at_plus_minus_one_on_the_target(tiny_models, copy_slider, tmp_path, cli):
    before = _change_at_one(tiny_models, copy_slider)
    target = round(2.5 * before, 4)
    out = tmp_path / "calibrated.safetensors"
    args = [
        "merge",
        copy_slider,
        "-o",
        out,
        "--model",
        tiny_models / "base",
        "--target-change",
        target,
        "--dtype",
        "fp32",
    ]
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    with safe_open(str(out), "pt") as f:
        note = json.loads(f.metadata()["loratool_calibration"])
    assert note["target"] == target and note["factor"] > 1 and abs(note["measured"] / target - 1) <= 0.2
    after = _change_at_one(tiny_models, out)
    assert abs(after / target - 1) <= 0.2, (before, after, target, note)


def test_calibrating_to_a_pair_targets_half_its_change(tiny_models, copy_slider, pair, tmp_path, monkeypatch):
    from loratool import calibrate
    from loratool.merge import MergeConfig
    from loratool.merge import run as merge

    monkeypatch.setattr(calibrate, "solve", lambda change, target: (2.0, target))  # the renders are tested above
    out = tmp_path / "pair.safetensors"
    merge(MergeConfig([copy_slider], out, model=str(tiny_models / "base"), calibrate=pair, dtype="fp32"))
    with safe_open(str(out), "pt") as f:
        note = json.loads(f.metadata()["loratool_calibration"])
    assert note["pair"] == [p.name for p in pair] and note["target"] == pytest.approx(note["pair_change"] / 2)
    assert note["pair_change"] == pytest.approx((235 - 20) / 255)
    before, after = (read(p, model_index(str(tiny_models / "base"))).network for p in (copy_slider, out))
    m = next(iter(before))
    assert torch.allclose(after.modules[m.key].delta(), 2.0 * m.delta(), rtol=1e-4, atol=1e-6)


def test_demo_sweeps_colour_from_a_quarter_in_and_size_and_position_from_the_first_step():
    """The start is per concept unless given: a given 0 is kept (it must not fall back to the concept default)."""
    from loratool.demo.run import DemoConfig

    assert DemoConfig(concept="colour").lora_start == 0.25
    assert DemoConfig(concept="size").lora_start == DemoConfig(concept="position").lora_start == 0.0
    assert DemoConfig(concept="colour", lora_start=0.0).lora_start == 0.0
    assert DemoConfig(concept="colour", lora_start=0.5).lora_start == 0.5


def test_the_size_demo_trains_its_halves_on_the_mid_and_up_blocks_with_hue_varied():
    """Per concept and recipe unless given, where it was measured (datasets/README.md): recipe 2's size halves on
    the mid and up blocks with hue varied, recipe 1's two size LoRAs on the mid and up blocks alone, 150 steps
    each."""
    from loratool.demo.run import DemoConfig
    from loratool.errors import InputError

    every = ["down", "mid", "up"]
    size = DemoConfig(concept="size")
    assert (size.blocks, size.vary) == (["mid", "up"], ["hue"])
    assert (DemoConfig(concept="size", recipe=1).blocks, DemoConfig(concept="size", recipe=1).vary) == (
        ["mid", "up"],
        [],
    )
    assert DemoConfig(concept="colour", recipe=1).blocks == every
    steps = {(r, c): DemoConfig(concept=c, recipe=r).steps for r in (1, 2) for c in ("size", "colour")}
    assert steps == {(1, "size"): 150, (1, "colour"): 300, (2, "size"): 300, (2, "colour"): 300}
    assert DemoConfig(concept="size", recipe=1, steps=300).steps == 300
    with pytest.raises(InputError, match="--steps must be at least 1"):
        DemoConfig(concept="size", recipe=1, steps=0)
    for concept in ("colour", "position"):
        assert (DemoConfig(concept=concept).blocks, DemoConfig(concept=concept).vary) == (every, [])
    assert (DemoConfig(concept="size", recipe=3).blocks, DemoConfig(concept="size", recipe=3).vary) == (every, [])
    assert DemoConfig(concept="size", blocks="down,mid,up", vary="").vary == []
    with pytest.raises(InputError, match="--vary varies the two halves of recipe 2"):
        DemoConfig(concept="size", recipe=3, vary="hue")


def test_the_demo_hands_blocks_and_vary_to_both_halves(tmp_path, monkeypatch):
    from loratool import train
    from loratool.demo.run import DemoConfig, make_slider

    seen = []
    monkeypatch.setattr(train, "run", lambda settings: seen.append((settings.blocks, settings.vary)))
    monkeypatch.setattr("loratool.merge.run", lambda config: config.output)
    make_slider(DemoConfig(output=tmp_path, concept="size"), tmp_path / "a.png", tmp_path / "b.png")
    assert seen == [(["mid", "up"], ["hue"])] * 2


def test_the_demo_says_when_its_halves_trained_on_some_blocks_only(tmp_path):
    from loratool.demo.run import describe

    q = {"mean_spearman": 1.0, "mean_glide": 0.4, "span": 0.9, "kept": 0.8}
    summary = {
        "config": {"blocks": ["mid", "up"], "lora_start": 0.0, "concept": "size", "seeds": [0], "scales": [-1, 0, 1]},
        "sweep": str(tmp_path / "sweep"), "slider": "s.safetensors", "sweep_prompt": "a square",
        "copy_psnr_db": {"copy_plus": 14.1}, "slider_quality": {"summary": q},
    }  # fmt: skip
    (tmp_path / "demo.json").write_text(json.dumps(summary))
    text = "\n".join(describe(tmp_path / "demo.json"))
    assert "trained on the mid and up blocks" in text and "copy_plus 14.1 dB (made to edit" in text
    summary["config"]["blocks"] = ["down", "mid", "up"]
    (tmp_path / "demo.json").write_text(json.dumps(summary))
    text = "\n".join(describe(tmp_path / "demo.json"))
    assert "trained on the" not in text and "made to edit" not in text


def test_demo_recipe_3_trains_one_slider_on_the_pair(tmp_path, monkeypatch):
    from loratool import train
    from loratool.demo.run import DemoConfig, make_slider
    from loratool.errors import InputError

    seen = []
    monkeypatch.setattr(train, "run", lambda config: seen.append(config) or [config.output])
    config = DemoConfig(output=tmp_path, recipe=3, steps=5)
    plus, minus = tmp_path / "plus.png", tmp_path / "minus.png"
    assert make_slider(config, plus, minus) == tmp_path / "slider.safetensors"
    (settings,) = seen
    assert isinstance(settings, SliderConfig) and settings.images == [plus, minus] and settings.model == "demo"
    with pytest.raises(InputError, match="--recipe must be 1"):
        DemoConfig(recipe=5)


def test_calibration_steps_back_below_a_scale_whose_renders_are_nan():
    """A scale that breaks the model is an infinite change: never the answer, and later tries stay below it."""
    from loratool import calibrate
    from loratool.errors import InputError

    tried = []

    def change(scale):  # linear, but NaN renders from ×5 on: the target's ×20 is out of reach
        tried.append(scale)
        return math.inf if scale >= 5 else 0.01 * scale

    scale, measured = calibrate.solve(change, 0.2)
    assert 1 < scale < 5 and measured == pytest.approx(0.01 * scale)
    broken = sorted(s for s in tried if s >= 5)
    assert broken and len(set(broken)) == len(broken)  # no NaN scale tried twice
    assert max(s for s in tried if s < 5) == scale  # and the largest finite one won
    with pytest.raises(InputError, match="NaN at ±1"):
        calibrate.solve(lambda scale: math.inf, 0.2)


def test_a_calibration_render_that_is_nan_counts_as_infinite_change(tiny_models, copy_slider, recwarn):
    from loratool.calibrate import Sweep, pipeline_with

    model = str(tiny_models / "base")
    sweep = Sweep(pipeline_with(model, read(copy_slider, model_index(model)).network), "", 64)
    assert math.isinf(sweep.change(1e5)) and sweep.tried == [(1e5, None)]
    assert not [w for w in recwarn if "invalid value" in str(w.message)]  # no 8-bit cast of NaN happened
