"""Dreambooth and the "wrong" LoRA on the tiny SDXL: 64 px, rank 4, a few steps, generated images cached."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from loratool.train import DreamboothConfig, run
from loratool.train.batch import Batch, Example, Pool
from loratool.train.loss import batch_weights

FAST = dict(resolution=64, rank=4, lr=1e-3, generate_steps=2)


def _image(path, size, seed):
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    array = np.stack([(x * 3 + seed) % 256, (y * 2) % 256, ((x + y) * seed) % 256], -1).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    _image(folder / "a.png", (64, 64), 1)
    _image(folder / "b.jpg", (96, 64), 2)
    _image(folder / "c.webp", (64, 80), 3)
    (folder / "b.txt").write_text("a photo of sks dog on the grass", encoding="utf-8")
    return folder


def _config(tiny_models, out, **kw):
    return DreamboothConfig(model=str(tiny_models / "base"), output=out, **(FAST | kw))


def test_prior_preservation_loss_is_instance_mean_plus_weighted_prior_mean():
    instance, prior = torch.tensor([1.0, 3.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])

    def loss(batches, losses, weight):
        return sum(w * x.mean() for w, x in zip(batch_weights(batches, weight), losses, strict=True)).item()

    def batch(is_prior):
        return Batch(torch.zeros(1), torch.zeros(1), [""], prior=is_prior)

    assert loss([batch(False), batch(True)], [instance, prior], 0.5) == 2.0 + 0.5 * 25.0
    assert loss([batch(False)], [instance], 0.5) == 2.0
    assert loss([batch(False), batch(True)], [instance, prior], 0.0) == 2.0
    assert batch_weights([batch(False), batch(False)]) == [0.5, 0.5]  # slider mode: the mean of its halves


def test_batches_come_from_one_bucket_with_each_images_own_micro_conditioning(tmp_path):
    from loratool.data.images import prepare

    sizes = {"wide": (256, 64), "wide2": (250, 66), "tall": (64, 192), "square": (100, 100)}
    images = {name: prepare(_image(tmp_path / f"{name}.png", size, 5), 128) for name, size in sizes.items()}
    assert images["wide"].target_size == (64, 256) and images["wide"].crop_top_left == (0, 0)
    assert images["wide2"].target_size == (64, 256) and images["wide2"].original_size == (66, 250)
    assert images["wide2"].crop_top_left == (2, 0)  # 250×66 covers 256×64 at 256×68: 4 rows cut, centred
    assert images["tall"].target_size == (192, 64) and images["square"].target_size == (128, 128)
    examples = [
        Example(torch.zeros(4, h // 8, w // 8), im.time_ids(), n)
        for n, im in images.items()
        for h, w in [im.target_size]
    ]
    pool = Pool(examples, None)
    assert {b: sorted(examples[i].caption for i in m) for b, m in pool.groups.items()} == {
        (8, 32): ["wide", "wide2"],
        (24, 8): ["tall"],
        (16, 16): ["square"],
    }
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = pool.draw(3, generator)
        assert len({images[c].target_size for c in batch.captions}) == 1
        for row, name in enumerate(batch.captions):
            assert batch.time_ids[row].tolist() == images[name].time_ids()


def _db_args(tiny_models, photos, out, *more):
    args = ["train", "--mode", "dreambooth", photos, "--prompt", "a photo of sks dog", "-o", out]
    args += ["--model", tiny_models / "base", "--resolution", "64", "--rank", "4", "--lr", "1e-3", "--steps", "3"]
    return [*args, "--generate-steps", "2", *more]


@pytest.fixture(scope="module")
def dreambooth(tiny_models, photos, tmp_path_factory):
    """Prior preservation (2 generated class images), text-encoder LoRAs, disk cache: run twice."""
    from typer.testing import CliRunner

    from loratool.cli import app

    root = tmp_path_factory.mktemp("db")
    out, classes, cache = root / "dog.safetensors", root / "classes", root / "cache"
    more = ["--class-prompt", "a photo of a dog", "--class-dir", classes, "--num-class-images", "2"]
    more += ["--prior-loss-weight", "0.5", "--train-text-encoder", "--cache-dir", cache, "--batch-size", "2"]
    runs = []
    for extra in ([], ["--force"]):
        result = CliRunner().invoke(app, [str(a) for a in _db_args(tiny_models, photos, out, *more, *extra)])
        assert result.exit_code == 0, result.stderr
        runs.append((result.stderr, {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}))
        logging.getLogger().handlers.clear()
    return out, runs, cache


def test_class_images_are_generated_once_and_reused(dreambooth):
    out, (first, second), cache = dreambooth
    assert "generating 2 class images" in first[0] and "generating" not in second[0]
    assert sorted(first[1]) == ["class-00000.png", "class-00001.png"] and first[1] == second[1]
    assert len(list(cache.glob("*.safetensors"))) == 3 + 2  # 3 instance latents, 2 class latents (TE trains)


def test_dreambooth_writes_unet_and_text_encoder_loras_that_load_in_diffusers(dreambooth, tiny_models, caplog):
    from diffusers import StableDiffusionXLPipeline

    out, _, _ = dreambooth
    keys = load_file(str(out))
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["loratool_mode"] == "dreambooth" and meta["loratool_trigger"] == "a photo of sks dog"
    assert meta["loratool_prior_loss_weight"] == "0.5" and meta["loratool_num_class_images"] == "2"
    assert json.loads(meta["ss_tag_frequency"])["photos0"]["a photo of sks dog"] == 2
    report = json.loads(out.with_name("dog.report.json").read_text())
    assert report["steps_done"] == 3 and len(report["dataset"]["class_images"]) == 2
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(out))
    assert "unexpected keys" not in caplog.text and "missing keys" not in caplog.text
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        assert any(hasattr(m, "lora_A") and len(m.lora_A) for m in model.modules())


def test_wrong_mode_generates_its_dataset_once_then_trains_on_the_trigger_word(tiny_models, tmp_path, cli):
    out, folder = tmp_path / "wrong.safetensors", tmp_path / "wrong-data"
    args = ["train", "--mode", "wrong", "-o", out, "--num-images", "3", "--wrong-dir", folder, "--steps", "2"]
    args += ["--model", tiny_models / "base", "--resolution", "64", "--rank", "4", "--generate-steps", "2"]
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    images = sorted(folder.glob("*.png"))
    assert [p.name for p in images] == [f"wrong-{i:05d}.png" for i in range(3)]
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in images]
    assert all("," in c for c in captions) and len(set(captions)) == 3
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["loratool_trigger"] == "wrong" and meta["loratool_mode"] == "wrong"
    assert meta["loratool_prompt_weighting"] == "compel (word)1.3"
    assert json.loads(meta["ss_tag_frequency"]) == {"wrong-data": {"wrong": 3}}
    stamps = [p.stat().st_mtime_ns for p in images]
    logging.getLogger().handlers.clear()
    code, _, stderr = cli(*args, "--force")
    assert code == 0, stderr
    assert "generating" not in stderr and [p.stat().st_mtime_ns for p in images] == stamps


def _bad(tmp_path, case):
    empty, no_images, latin1 = tmp_path / "empty", tmp_path / "notes", tmp_path / "latin1"
    for folder in (empty, no_images, latin1):
        folder.mkdir()
    (no_images / "readme.md").write_text("no pictures here")
    _image(latin1 / "dog.png", (64, 64), 1)
    (latin1 / "dog.txt").write_bytes("un chien très sage".encode("latin-1"))
    return {
        "empty folder": ([empty], "is empty"),
        "no images": ([no_images], "no PNG, JPEG or WebP"),
        "caption not UTF-8": ([latin1], "dog.txt is not UTF-8"),
        "no class images": ([latin1, "--class-prompt", "a dog", "--num-class-images", "0"], "--num-class-images"),
        "pure noise outside copy mode": (
            [latin1, "--pure-noise", "0.25"],
            "--pure-noise is a copy and slider-mode option",
        ),
    }[case]


@pytest.mark.parametrize(
    "case", ["empty folder", "no images", "caption not UTF-8", "no class images", "pure noise outside copy mode"]
)
def test_bad_input_is_one_line_naming_the_culprit_and_exit_1(case, tiny_models, tmp_path, cli):
    args, culprit = _bad(tmp_path, case)
    out = tmp_path / "out.safetensors"
    code, _, stderr = cli(
        "train", "--mode", "dreambooth", *args, "--prompt", "sks", "--model", tiny_models / "base", "-o", out
    )
    assert code == 1, (case, stderr)
    assert stderr.startswith("loratool: error:") and stderr.strip().count("\n") == 0 and culprit in stderr
    assert not out.exists()


def test_two_processes_train_what_one_process_trains(tiny_models, photos, tmp_path):
    """`accelerate launch --num_processes 2 --cpu`: each process takes half of every batch (DDP)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:  # a free port: other test runs may share this machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one_process = tmp_path / "one.safetensors"
    run(_config(tiny_models, one_process, images=[photos], prompt="a photo of sks dog", steps=3, batch_size=2))
    out = tmp_path / "two.safetensors"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", port, "-m", "loratool"]
    args = [str(a) for a in _db_args(tiny_models, photos, out, "--batch-size", "2")]
    done = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(out), str(out.with_name("two.report.json"))]  # the main process writes
    one, two = load_file(str(one_process)), load_file(str(out))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert any(one[k].abs().sum() > 0 for k in one if "lora_up" in k)  # trained: not two identical inits


def test_resume_refuses_a_checkpoint_trained_with_another_instance_prompt(tiny_models, photos, tmp_path, cli):
    out = tmp_path / "dog.safetensors"
    code, _, stderr = cli(*_db_args(tiny_models, photos, out, "--save-every", "1"))
    assert code == 0, stderr
    args = _db_args(tiny_models, photos, out, "--save-every", "1", "--resume", "--force")
    args[args.index("--prompt") + 1] = "a photo of zwx cat"
    code, _, stderr = cli(*args)
    assert code == 1 and "was trained with prompt='a photo of sks dog'" in stderr, stderr
    assert stderr.strip().count("\n") == 0
