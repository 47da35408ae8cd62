"""Bad inputs, one row each: exit 1, one line on stderr naming the culprit, no traceback, nothing at the output.

Every row fails before any training or rendering starts, so the table runs in seconds on the tiny models.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from loratool.lora.io import keymap_for, write_lora
from tests.test_lora_files import random_network


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    """An image, a good kohya LoRA for the tiny base, and damaged copies of it, one per defect."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("bad")
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(root / "image.png")
    unet = UNet2DConditionModel.from_pretrained(tiny_models / "base" / "unet")
    good = root / "good.safetensors"
    write_lora(random_network(SimpleNamespace(unet=unet), conv=False, te=False), good, keymap=keymap_for(unet))
    tensors = load_file(good)
    down = next(k for k in tensors if k.endswith("lora_down.weight"))
    alpha = down.replace("lora_down.weight", "alpha")
    damaged = {
        "nan": {down: torch.full_like(tensors[down], float("nan"))},
        "zero_d": {down: torch.tensor(1.0)},
        "huge": {down: tensors[down].clone().index_fill_(1, torch.tensor([0]), 1e20)},
        "int8": {down: tensors[down].to(torch.int8)},
        "nan_alpha": {alpha: torch.tensor(float("nan"))},
        "vector_alpha": {alpha: torch.ones(3)},
    }
    for name, change in damaged.items():
        save_file(tensors | change, root / f"{name}.safetensors")
    return root


def _cases(root, tiny_models):
    base = ["--model", str(tiny_models / "base")]
    train = ["train", str(root / "image.png"), *base, "--steps", "2", "--resolution", "64"]
    sample = ["sample", *base, "--refiner", "none", "--steps", "2"]
    merge = ["merge", *base]
    lora = str(root / "good.safetensors")
    return {
        # train options: every float finite, integers in range, a device torch knows
        "train --alpha inf": ([*train, "--alpha", "inf"], "--alpha"),
        "train --noise-offset nan": ([*train, "--noise-offset", "nan"], "--noise-offset"),
        "train --lr nan": ([*train, "--lr", "nan"], "--lr"),
        "train --min-snr-gamma inf": ([*train, "--min-snr-gamma", "inf"], "--min-snr-gamma"),
        "train --seed 1e23": ([*train, "--seed", str(10**23)], "--seed"),
        "train --seed -1": ([*train, "--seed", "-1"], "--seed"),
        "train --device tpu9": ([*train, "--device", "tpu9"], "--device"),
        "train --base-lora FILE:nan": ([*train, "--base-lora", f"{lora}:nan"], "nan"),
        "train --base-lora NaN file": ([*train, "--base-lora", str(root / "nan.safetensors")], "nan.safetensors"),
        # sample options
        "sample --guidance nan": ([*sample, "--guidance", "nan"], "--guidance"),
        "sample --lora-start nan": ([*sample, "--lora-start", "nan"], "--lora-start"),
        "sample --seeds 1e23": ([*sample, "--seeds", "1e23"], "--seeds"),
        "sample --seeds 10**23": ([*sample, "--seeds", str(10**23)], "--seeds"),
        "sample --device tpu9": ([*sample, "--device", "tpu9"], "--device"),
        "sample --points 100000": ([*sample, "--lora", lora, "--points", "100000"], "--points"),
        "sample --lora FILE:inf": ([*sample, "--lora", f"{lora}:inf"], "inf"),
        # merge options and weights
        "merge --alpha 0": ([*merge, lora, "--alpha", "0"], "--alpha"),
        "merge --alpha nan": ([*merge, lora, "--alpha", "nan"], "--alpha"),
        "merge --sv-fro nan": ([*merge, lora, "--sv-fro", "nan"], "--sv-fro"),
        "merge FILE:nan": ([*merge, f"{lora}:nan"], "nan"),
        "merge FILE:abc": ([*merge, f"{lora}:abc"], "abc"),
        # LoRA tensors: finite, floating point, 2-d or 4-d, in range; alpha one finite number
        "merge NaN factor": ([*merge, str(root / "nan.safetensors")], "nan.safetensors"),
        "merge 0-d factor": ([*merge, str(root / "zero_d.safetensors")], "zero_d.safetensors"),
        "merge 1e20 entry": ([*merge, str(root / "huge.safetensors")], "huge.safetensors"),
        "merge int8 factors": ([*merge, str(root / "int8.safetensors")], "int8.safetensors"),
        "merge NaN alpha": ([*merge, str(root / "nan_alpha.safetensors")], "nan_alpha.safetensors"),
        "merge vector alpha": ([*merge, str(root / "vector_alpha.safetensors")], "vector_alpha.safetensors"),
    }


CASES = [
    *("train --alpha inf", "train --noise-offset nan", "train --lr nan", "train --min-snr-gamma inf"),
    *("train --seed 1e23", "train --seed -1", "train --device tpu9", "train --base-lora FILE:nan"),
    "train --base-lora NaN file",
    *("sample --guidance nan", "sample --lora-start nan", "sample --seeds 1e23", "sample --seeds 10**23"),
    *("sample --device tpu9", "sample --points 100000", "sample --lora FILE:inf"),
    *("merge --alpha 0", "merge --alpha nan", "merge --sv-fro nan", "merge FILE:nan", "merge FILE:abc"),
    *("merge NaN factor", "merge 0-d factor", "merge 1e20 entry", "merge int8 factors", "merge NaN alpha"),
    "merge vector alpha",
]


def test_the_table_lists_every_case(files, tiny_models):
    assert sorted(CASES) == sorted(_cases(files, tiny_models))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_culprit(case, files, tiny_models, tmp_path, cli):
    args, culprit = _cases(files, tiny_models)[case]
    out = tmp_path / ("samples" if args[0] == "sample" else "out.safetensors")
    code, stdout, stderr = cli(*args, "-o", out)
    assert code == 1, (case, stderr)
    assert stderr.startswith("loratool: error:") and stderr.strip().count("\n") == 0, stderr
    assert culprit in stderr and "Traceback" not in stderr, stderr
    assert not out.exists() and not list(tmp_path.iterdir())
