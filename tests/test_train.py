"""Copy-machine training on the tiny SDXL: 64 px, rank 4, a few dozen steps."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from loratool.files import sha256
from loratool.train import TrainConfig, run
from loratool.train import loop as train_loop

FAST = dict(resolution=64, rank=4, lr=1e-3, check_seeds=1, check_steps=4)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    y, x = np.mgrid[0:80, 0:96]
    array = np.stack([(x * 2) % 256, (y * 3) % 256, ((x + y) * 4) % 256], -1).astype(np.uint8)
    array[20:50, 30:60] = (255, 0, 0)
    path = tmp_path_factory.mktemp("img") / "image.png"
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tiny_models, image, tmp_path_factory):
    """One CLI run of 30 steps, shared by the tests that read its outputs."""
    from typer.testing import CliRunner

    from loratool.cli import app

    out = tmp_path_factory.mktemp("trained") / "copy.safetensors"
    args = ["train", str(image), "--model", str(tiny_models / "base"), "-o", str(out), "--steps", "30"]
    args += ["--resolution", "64", "--rank", "4", "--lr", "1e-2", "--check-every", "10"]
    args += ["--check-seeds", "1", "--check-steps", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return out, result.stdout


def _config(tiny_models, image, out, **kw):
    return TrainConfig(images=[image], model=str(tiny_models / "base"), output=out, **(FAST | kw))


def test_thirty_steps_lower_the_fixed_eval_loss_and_write_report_and_preview(trained):
    out, stdout = trained
    report = json.loads(out.with_name("copy.report.json").read_text())
    assert report["eval_loss"]["end"] < report["eval_loss"]["start"]
    assert len(report["loss"]) == report["steps_done"] == 30
    assert [c["step"] for c in report["copy_checks"]] == [0, 10, 20, 30]
    assert report["image"]["original_size"] == [80, 96] and report["image"]["target_size"] == [64, 64]
    assert report["timings"]["it_per_s"] > 0 and report["peak_memory"]["rss_peak_mb"] > 0
    preview = Image.open(out.with_name("copy.preview.png"))
    assert preview.size == (64 * 2, 64 * 4)  # training image + 1 seed, one row per check
    assert stdout.split() == [str(out), str(out.with_name("copy.report.json")), str(out.with_name("copy.preview.png"))]


def test_metadata_describes_the_lora(trained, image):
    out, _ = trained
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["loratool_recipe"] == "copy" and meta["loratool_rank"] == "4" and meta["ss_network_dim"] == "4"
    assert meta["loratool_image_sha256"] == sha256(image) and meta["loratool_steps"] == "30"
    assert all(k.startswith("lora_unet_") for k in load_file(str(out)))
    # the tiny model is not SDXL 1.0 base: say what was used instead of claiming sdxl_base_v1-0
    assert meta["ss_base_model_version"] == "sdxl_custom" and meta["ss_sd_model_name"].endswith("base")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and meta["modelspec.title"] == "copy"
    assert meta["modelspec.resolution"] == "64x64" and len(meta["sshs_model_hash"]) == 64


def test_lora_loads_in_diffusers_and_matches_folding(trained, tiny_models, caplog):
    from diffusers import StableDiffusionXLPipeline

    from loratool.lora.apply import fold_network
    from loratool.lora.io import keymap_for, read_lora

    out, _ = trained
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    folded = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base").unet
    network = read_lora(out, keymap_for(folded))
    fold_network(folded, network, "unet", 1.0)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(out))
    # diffusers warns "...led to unexpected keys / missing keys..." when names do not match the model
    assert "unexpected keys" not in caplog.text and "missing keys" not in caplog.text
    injected = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert len(injected) == len(network) > 0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = dict(
        encoder_hidden_states=torch.randn(1, 77, 80),
        added_cond_kwargs={"text_embeds": torch.randn(1, 40), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])},
    )
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, 500, **cond).sample, folded(x, 500, **cond).sample, atol=1e-5)


def test_ctrl_c_writes_a_usable_lora_and_resume_matches_an_uninterrupted_run(
    tiny_models, image, tmp_path, monkeypatch, cli
):
    from loratool.lora.io import keymap_for, read_lora

    straight = tmp_path / "straight.safetensors"
    run(_config(tiny_models, image, straight, steps=12, check_every=0))

    real_step, calls = train_loop.train_step, []

    def interrupt_at_seven(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "train_step", interrupt_at_seven)
    stopped = tmp_path / "stopped.safetensors"
    args = ["train", image, "--model", tiny_models / "base", "-o", stopped, "--steps", "12", "--save-every", "4"]
    args += ["--resolution", "64", "--rank", "4", "--lr", "1e-3", "--check-every", "0"]
    code, _, stderr = cli(*args)
    assert code == 130 and stderr.strip().splitlines()[-1].startswith("loratool: error: interrupted at step 6")
    with safe_open(str(stopped), "pt") as f:
        assert f.metadata()["loratool_steps"] == "6"
    assert len(read_lora(stopped, keymap_for(_unet(tiny_models)))) > 0  # a complete, readable file

    monkeypatch.setattr(train_loop, "train_step", real_step)
    code, _, stderr = cli(*args, "--resume")
    assert code == 0, stderr
    a, b = load_file(str(straight)), load_file(str(stopped))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def _unet(tiny_models):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_models / "base", subfolder="unet")


def test_base_lora_changes_the_starting_unet_exactly_as_folding_would(trained, tiny_models, image):
    from loratool.lora.apply import model_path
    from loratool.lora.io import keymap_for, read_lora
    from loratool.train.copy_machine import load_trainee

    out, _ = trained
    fresh = _unet(tiny_models)
    network = read_lora(out, keymap_for(fresh))
    config = _config(tiny_models, image, out, steps=1, check_every=0, base_loras=[f"{out}:-0.5"])
    trainee = load_trainee(config, image)
    assert trainee.base_loras[0]["weight"] == -0.5
    for m in network:
        path = model_path(fresh, "unet", m.path)
        expected = fresh.get_submodule(path).weight - 0.5 * m.delta()
        got = trainee.unet.get_submodule(path).base_layer.weight
        assert torch.allclose(got, expected, atol=1e-6), path


def test_pair_trains_both_images_and_a_reachable_copy_target_stops_early(tiny_models, image, tmp_path, cli):
    other = tmp_path / "b.png"
    array = np.asarray(Image.open(image)).copy()
    array[60:70, 10:20] = 0
    Image.fromarray(array).save(other)
    args = ["train", "--pair", image, other, "--model", tiny_models / "base", "-o", tmp_path / "slider"]
    args += ["--steps", "6", "--resolution", "64", "--rank", "4", "--check-every", "2", "--check-seeds", "1"]
    args += ["--check-steps", "2", "--copy-target", "1"]  # the tiny model's renders sit near 8 dB
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    for tag in ("a", "b"):
        assert str(tmp_path / f"slider_{tag}.safetensors") in stdout
        report = json.loads((tmp_path / f"slider_{tag}.report.json").read_text())
        assert report["steps_done"] == 4 and report["stopped_early"]  # two checks in a row: 2 and 4


def test_train_until_copied_stops_at_the_second_check_in_a_row_that_reaches_the_target(tiny_models, image, tmp_path):
    """A high-lr run with a low target stops before its budget, once two checks in a row after step 0 reach
    it (the untrained step-0 check reaches 5 dB too and does not count), and its LoRA and report say so."""
    out = tmp_path / "early.safetensors"
    paths = run(_config(tiny_models, image, out, lr=1e-2, steps=40, check_every=10, copy_target=5.0))
    assert out in paths
    report = json.loads(out.with_name("early.report.json").read_text())
    copy = report["copy"]
    assert report["steps_done"] == 20 < 40 and report["stopped_early"]
    assert copy["copied"] and copy["stopped_at"] == 20 and copy["stopped_because"] == "copied"
    assert [c["step"] for c in copy["curve"]] == [0, 10, 20] and copy["target_db"] == 5.0
    assert all(c["mean_psnr"] >= c["min_psnr"] > 1 for c in copy["curve"])
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["loratool_steps"] == "20"


def test_an_unreachable_copy_target_uses_the_whole_budget(tiny_models, image, tmp_path, caplog):
    out = tmp_path / "budget.safetensors"
    with caplog.at_level(logging.WARNING):
        run(_config(tiny_models, image, out, steps=6, check_every=3, copy_target=60.0, check_seeds=1))
    assert "above the VAE's own" in caplog.text  # said at the start, not after the budget ran out
    report = json.loads(out.with_name("budget.report.json").read_text())
    assert report["steps_done"] == 6 and not report["stopped_early"]
    assert report["copy"]["stopped_because"] == "budget" and not report["copy"]["copied"]
    assert [c["step"] for c in report["copy"]["curve"]] == [0, 3, 6]


def test_stop_when_copied_is_on_by_default_and_reads_older_configs():
    from loratool.train.config import COPY_TARGET_DB, DreamboothConfig

    config = TrainConfig(images=["a.png"], steps=100)
    assert config.stop_when_copied and config.copy_target == COPY_TARGET_DB == 22.0 and config.check_every == 10
    assert config.check_seeds == 4 and config.resolution is None
    older = TrainConfig(images=["a.png"], stop_when_copied=30.0)  # the number older configs recorded
    assert older.stop_when_copied is True and older.copy_target == 30.0
    assert TrainConfig(images=["a.png"], stop_when_copied=None).stop_when_copied is False
    assert not TrainConfig(images=["a.png"], check_every=0).stop_when_copied  # nothing to stop on
    assert not DreamboothConfig(images=["d"], prompt="sks").stop_when_copied


def test_copy_and_slider_mode_default_to_the_measured_copy_settings_and_the_others_do_not():
    """lr 1e-3, offset noise 0.2, a quarter from pure noise (benchmarks/copies.py), and for a copy of one image
    only multi-resolution noise 0.5 and rank-4 LoRAs on the 3×3 convs: a --pair's halves and slider mode train
    without them. Dreambooth and text sliders keep no offset, pure or multi-resolution noise and no convs; a
    value given wins, and the record holds the values used, never None."""
    from loratool.train.config import DreamboothConfig, SliderConfig

    copy = TrainConfig(images=["a.png"])
    assert (copy.lr, copy.noise_offset, copy.pure_noise) == (1e-3, 0.2, 0.25)
    assert (copy.multires_noise, copy.conv_rank) == (0.5, 4)
    assert copy.record()["noise_offset"] == 0.2 and copy.record()["multires_noise"] == 0.5
    assert copy.record()["conv_rank"] == 4
    for halves in (TrainConfig(images=["a.png", "b.png"], pair=True), SliderConfig(images=["a.png", "b.png"])):
        assert (halves.lr, halves.noise_offset, halves.pure_noise) == (1e-3, 0.2, 0.25)
        assert (halves.multires_noise, halves.conv_rank) == (0.0, 0)
    booth = DreamboothConfig(images=["d"], prompt="sks")
    assert (booth.lr, booth.noise_offset, booth.pure_noise, booth.multires_noise, booth.conv_rank) == (1e-4, 0, 0, 0, 0)
    text = SliderConfig(images=[], positive="a large circle", negative="a small circle")
    assert (text.noise_offset, text.pure_noise, text.multires_noise, text.conv_rank) == (0.0, 0.0, 0.0, 0)
    given = TrainConfig(images=["a.png"], lr=5e-4, noise_offset=0.0, pure_noise=0.0, multires_noise=0.0, conv_rank=0)
    assert (given.lr, given.noise_offset, given.pure_noise, given.multires_noise, given.conv_rank) == (5e-4, 0, 0, 0, 0)
    asked = TrainConfig(images=["a.png", "b.png"], pair=True, multires_noise=0.5, conv_rank=2)
    assert (asked.multires_noise, asked.conv_rank) == (0.5, 2)


def test_resolution_defaults_to_the_models_native_size(tiny_models, image, tmp_path):
    """The tiny UNet's sample_size is 8 latents: 64 px, as `sample` renders it, not 1024."""
    out = tmp_path / "native.safetensors"
    config = TrainConfig(images=[image], model=str(tiny_models / "base"), output=out, rank=4, steps=1, check_every=0)
    run(config)
    report = json.loads(out.with_name("native.report.json").read_text())
    assert report["settings"]["resolution"] == 64 and report["image"]["target_size"] == [64, 64]
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.resolution"] == "64x64"


def test_gradient_checkpointing_gives_the_same_steps(tiny_models, image, tmp_path):
    plain = _config(tiny_models, image, tmp_path / "p.safetensors", steps=3, check_every=0)
    ckpt = _config(tiny_models, image, tmp_path / "c.safetensors", steps=3, check_every=0, gradient_checkpointing=True)
    run(plain), run(ckpt)
    losses = [json.loads((tmp_path / f"{n}.report.json").read_text())["loss"] for n in ("p", "c")]
    assert np.allclose(losses[0], losses[1], atol=1e-5)


def _bad_inputs(tmp_path, tiny_models, image):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 90)).save(small)
    blocker = tmp_path / "file"
    blocker.write_text("")
    model = ["--model", str(tiny_models / "base")]
    return {
        "missing image": [str(tmp_path / "nope.png"), *model],
        "not an image": [str(text), *model],
        "image under 64 px": [str(small), *model],
        "unreadable model": [str(image), "--model", str(tmp_path / "no-model")],
        "unwritable output": [str(image), *model, "-o", str(blocker / "x.safetensors")],
        "rank out of range": [str(image), *model, "--rank", "0"],
        "pure noise out of range": [str(image), *model, "--pure-noise", "1"],
        "multires noise out of range": [str(image), *model, "--multires-noise", "1"],
        "8-bit adam without CUDA": [str(image), *model, "--optimizer", "adamw8bit"],
        "quantized base without CUDA": [str(image), *model, "--quantize-base", "nf4"],
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing image",
        "not an image",
        "image under 64 px",
        "unreadable model",
        "unwritable output",
        "rank out of range",
        "pure noise out of range",
        "multires noise out of range",
        "8-bit adam without CUDA",
        "quantized base without CUDA",
    ],
)
def test_bad_input_is_one_line_and_exit_1_with_nothing_written(case, tiny_models, image, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    args = _bad_inputs(tmp_path, tiny_models, image)[case]
    out = [] if "-o" in args else ["-o", str(tmp_path / "out.safetensors")]
    code, stdout, stderr = cli("train", *args, *out, "--steps", "2", "--resolution", "64")
    assert code == 1, (case, stderr)
    assert stderr.startswith("loratool: error:") and stderr.strip().count("\n") == 0
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob("*.report.json"))


def test_an_unknown_mode_is_one_line_and_exit_1(cli, image):
    code, _, stderr = cli("train", image, "--mode", "textual-inversion")
    assert code == 1 and "--mode must be copy, slider, dreambooth or wrong, not" in stderr


def test_a_checkpoint_from_before_multires_noise_resumes_as_off_and_refuses_it_on(tmp_path):
    """state.json files written before --multires-noise existed have no such key: they trained without it."""
    from loratool.errors import InputError
    from loratool.train.checkpoint import MUST_MATCH, _check_settings

    settings = {key: None for key in MUST_MATCH} | {"multires_noise": 0.0}
    old = {key: value for key, value in settings.items() if key != "multires_noise"}
    _check_settings(tmp_path / "state.json", old, settings)
    with pytest.raises(InputError, match=r"multires_noise=0\.0, not 0\.5; pass the same settings"):
        _check_settings(tmp_path / "state.json", old, settings | {"multires_noise": 0.5})


def test_a_checkpoint_from_before_blocks_and_vary_resumes_on_every_block_and_refuses_others(tmp_path):
    from loratool.errors import InputError
    from loratool.train.checkpoint import MUST_MATCH, _check_settings

    settings = {key: None for key in MUST_MATCH} | {"blocks": ["down", "mid", "up"], "vary": []}
    old = {key: value for key, value in settings.items() if key not in ("blocks", "vary")}
    _check_settings(tmp_path / "state.json", old, settings)
    with pytest.raises(InputError, match=r"blocks=\['down', 'mid', 'up'\], not \['mid', 'up'\]"):
        _check_settings(tmp_path / "state.json", old, settings | {"blocks": ["mid", "up"]})
    with pytest.raises(InputError, match=r"vary=\[\], not \['hue'\]"):
        _check_settings(tmp_path / "state.json", old, settings | {"vary": ["hue"]})
