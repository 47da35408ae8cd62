import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file


def _render(cli, tmp_path, name, *model_args, refiner="none"):
    out = tmp_path / name
    code, stdout, stderr = cli(
        "sample",
        "--prompt",
        "a red circle",
        "--seed",
        "3",
        "--steps",
        "4",
        "-o",
        out,
        "--refiner",
        refiner,
        *model_args,
    )
    assert code == 0, stderr
    from PIL import Image

    return np.asarray(Image.open(out / "seed3.png"), dtype=np.float32) / 255, out / "seed3.png"


# The two loads hold identical weights but differ by ~1e-6 in float (memory layout); a pixel sitting on a rounding
# boundary of the 8-bit PNG can then move by one step, so compare to one step, not to float precision.
ONE_PNG_STEP = 1.0 / 255 + 1e-6


def test_folder_and_single_file_render_the_same(cli, tiny_models, tmp_path):
    a, _ = _render(cli, tmp_path, "folder", "--model", tiny_models / "base")
    b, _ = _render(
        cli,
        tmp_path,
        "file",
        "--model",
        tiny_models / "base.safetensors",
        "--model-config",
        tiny_models / "base",
    )
    assert np.abs(a - b).max() <= ONE_PNG_STEP


def test_refiner_from_folder_and_file_render_the_same(cli, tiny_models, tmp_path):
    a, png = _render(cli, tmp_path, "folder", "--model", tiny_models / "base", refiner=tiny_models / "refiner")
    b, _ = _render(
        cli,
        tmp_path,
        "file",
        "--model",
        tiny_models / "base",
        "--refiner-config",
        tiny_models / "refiner",
        refiner=tiny_models / "refiner.safetensors",
    )
    assert np.abs(a - b).max() <= ONE_PNG_STEP
    from PIL import Image

    text = Image.open(png).text
    assert "Seed: 3" in text["parameters"] and json.loads(text["loratool"])["seed"] == 3


def test_refiner_shares_text_encoder_2_and_vae(tiny_models):
    from loratool.sdxl.models import load_models, pick_runtime

    base, refiner = load_models(str(tiny_models / "base"), str(tiny_models / "refiner"), pick_runtime("cpu"))
    assert refiner.text_encoder_2 is base.text_encoder_2
    assert refiner.vae is base.vae


def test_single_file_export_round_trips_every_tensor(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    a = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    b = StableDiffusionXLPipeline.from_single_file(
        str(tiny_models / "base.safetensors"), config=str(tiny_models / "base")
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def _fails_with(cli, tmp_path, message, *args):
    code, out, err = cli("sample", "--steps", "2", "-o", tmp_path / "o", *args)
    assert code == 1, (out, err)
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_missing_path(cli, tmp_path):
    _fails_with(cli, tmp_path, "no such file or folder", "--model", tmp_path / "nope.safetensors")


def test_uncached_hub_id_offline(cli, tmp_path):
    _fails_with(
        cli,
        tmp_path,
        "pass a local diffusers folder",
        "--model",
        "someone/not-cached-sdxl",
        "--refiner",
        "none",
    )


def test_folder_that_is_not_a_pipeline(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails_with(cli, tmp_path, "has no model_index.json", "--model", tmp_path / "empty")


def test_folder_of_another_pipeline(cli, tmp_path):
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    _fails_with(cli, tmp_path, "holds a StableDiffusionPipeline", "--model", folder)


def test_sd15_checkpoint(cli, tmp_path):
    ckpt = tmp_path / "v1-5.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)}, ckpt)
    _fails_with(cli, tmp_path, "is Stable Diffusion 1.x checkpoint, not an SDXL base", "--model", ckpt)


def test_refiner_checkpoint_as_base(cli, tiny_models, tmp_path):
    _fails_with(cli, tmp_path, "an SDXL refiner checkpoint", "--model", tiny_models / "refiner.safetensors")


def test_single_file_offline_without_config(cli, tiny_models, tmp_path):
    _fails_with(cli, tmp_path, "--model-config", "--model", tiny_models / "base.safetensors", "--refiner", "none")


def test_corrupt_checkpoint(cli, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    _fails_with(cli, tmp_path, "not a readable .safetensors", "--model", bad)


def test_existing_output_needs_force(cli, tiny_models, tmp_path):
    _render(cli, tmp_path, "x", "--model", tiny_models / "base")
    code, _, err = cli(
        "sample",
        "--steps",
        "2",
        "--seed",
        "3",
        "-o",
        tmp_path / "x",
        "--model",
        tiny_models / "base",
        "--refiner",
        "none",
    )
    assert code == 1 and "--force" in err


@pytest.mark.parametrize("precision,device,dtype", [("auto", "cpu", "fp32"), ("bf16", "cpu", "bf16")])
def test_runtime(precision, device, dtype):
    from loratool.sdxl.models import pick_runtime

    assert pick_runtime(device, precision).dtype_name == dtype
