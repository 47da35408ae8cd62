"""Recipe 4, the text slider (train --mode slider --positive/--negative/--target): what it writes, what it
learns on the demo model, what it refuses, and how the demo trains one from a pair's two captions."""

import json

import pytest
import torch
from safetensors import safe_open

from loratool.sdxl.index import model_index, read
from loratool.train import SliderConfig, run


def test_a_text_slider_is_written_with_its_prompts_and_no_copy_outputs(tiny_models, tmp_path, cli):
    out, model = tmp_path / "text.safetensors", str(tiny_models / "base")
    prompts = ["--positive", "a large red circle", "--negative", "a small red circle", "--target", "a red circle"]
    code, stdout, stderr = cli("train", "--mode", "slider", *prompts, "--model", model, "-o", out,
                               "--steps", "3", "--renders", "2", "--strength", "4")  # fmt: skip
    assert code == 0, stderr
    assert stdout.split() == [str(out), str(out.with_name("text.report.json"))]  # no preview: nothing to copy
    assert len(read(out, model_index(model)).network) > 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["loratool_slider"] == "true" and meta["loratool_mode"] == "slider"
    assert json.loads(meta["loratool_text_slider"]) == {
        "positive": "a large red circle", "negative": "a small red circle", "target": "a red circle",
        "strength": 4.0, "renders": 2,
    }  # fmt: skip
    report = json.loads(out.with_name("text.report.json").read_text())
    assert report["settings"]["pure_noise"] == 0.0 and report["settings"]["noise_offset"] == 0.0
    assert report["copy_checks"] == [] and report["dataset"]["positive"] == "a large red circle"
    code, _, stderr = cli("train", "--mode", "copy", "--positive", "a", "--negative", "b", "x.png", "--model", model)
    assert code == 1 and "slider-mode option" in stderr


def test_a_text_slider_learns_the_models_own_direction_between_two_prompts(tmp_path):
    """Recipe 4 on the demo model (a random tiny model has next to no direction between two captions): the
    slider's +1 minus −1 prediction points along the base's own estimate with --positive minus with --negative,
    in the target prompt, at noise it never saw (measured after 40 steps on one render: cosine 0.80–0.96, and
    |moved| 0.78–1.07 × |direction| of the 2 × asked for)."""
    from loratool.lora.apply import adapters_off, add_adapter, set_scale
    from loratool.sdxl.index import ModelIndex
    from loratool.sdxl.models import load_pipeline, pick_runtime
    from loratool.train.slider import embed

    out, texts = tmp_path / "text.safetensors", ("a red circle", "a large red circle", "a small red circle")
    run(SliderConfig(images=[], target=texts[0], positive=texts[1], negative=texts[2], model="demo", output=out,
                     steps=40, renders=1))  # fmt: skip
    pipe = load_pipeline("demo", pick_runtime(None, "fp32"))
    (target, pooled), plus, minus = (embed(pipe, p) for p in texts)
    add_adapter(pipe.unet, read(out, ModelIndex.of_pipeline(pipe)).network, "unet", "s")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(99))
    time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]])

    def eps(embeds, t, scale=1.0):
        set_scale(pipe.unet, "s", scale)
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([t]), encoder_hidden_states=embeds[0],
                             added_cond_kwargs={"text_embeds": embeds[1], "time_ids": time_ids}).sample  # fmt: skip

    for t in (100, 500, 900):
        with adapters_off(pipe.unet):
            direction, base = eps(plus, t) - eps(minus, t), eps((target, pooled), t)
        assert torch.equal(eps((target, pooled), t, 0.0), base)  # off is the LoRA at 0; back on afterwards
        moved = eps((target, pooled), t, 1.0) - eps((target, pooled), t, -1.0)  # asked for: 2 × direction
        cosine = torch.nn.functional.cosine_similarity(moved.flatten(), direction.flatten(), dim=0)
        assert cosine > 0.6 and moved.norm() > 0.3 * direction.norm(), (t, float(cosine))


def test_a_text_slider_needs_both_prompts_and_no_images(tmp_path):
    from loratool.errors import InputError

    with pytest.raises(InputError, match="both --positive and --negative"):
        SliderConfig(images=[], positive="a large circle")
    with pytest.raises(InputError, match="drop the images"):
        SliderConfig(images=[tmp_path / "a.png", tmp_path / "b.png"], positive="a", negative="b")
    with pytest.raises(InputError, match="the same prompt"):
        SliderConfig(images=[], positive="a circle", negative="a circle")
    with pytest.raises(InputError, match="--strength"):
        SliderConfig(images=[], positive="a", negative="b", strength=0)
    with pytest.raises(InputError, match="--positive P --negative N"):
        SliderConfig(images=[])
    config = SliderConfig(images=[], positive="a", negative="b")
    assert (config.check_every, config.stop_when_copied, config.pure_noise, config.noise_offset) == (0, False, 0.0, 0.0)
    assert config.lr == 1e-3 and config.target == ""


def test_the_demo_recipe_4_trains_on_the_pairs_two_captions_in_the_sweep_prompt(tmp_path, monkeypatch):
    from loratool import train
    from loratool.demo.run import DemoConfig, make_slider
    from loratool.demo.shapes import concept_pair

    seen = []
    monkeypatch.setattr(train, "run", lambda config: seen.append(config))
    config = DemoConfig(output=tmp_path, concept="colour", recipe=4, pair_seed=1)
    make_slider(config, tmp_path / "plus.png", tmp_path / "minus.png")
    _, _, minus, plus = concept_pair("colour", 1)
    (settings,) = seen
    assert (settings.positive, settings.negative) == (plus.caption, minus.caption)
    assert settings.target == config.sweep_prompt() == "a square in the center" and settings.images == []
