"""One reader for every verb: `FILE[:WEIGHT]` parsed one way, and the same bad file refused the same way."""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from loratool.errors import InputError, LoraFileError
from loratool.lora.io import keymap_for, write_lora
from loratool.lora.network import LoraModule
from loratool.sdxl.index import LoraSpec, ModelIndex, model_index, parse_spec, read
from tests.test_lora_files import random_network


@pytest.mark.parametrize(
    "text,path,weight",
    [
        ("a.safetensors", "a.safetensors", 1.0),
        ("a.safetensors:-0.5", "a.safetensors", -0.5),
        ("a.safetensors:1e-1", "a.safetensors", 0.1),
        ("dir/a.safetensors:2", "dir/a.safetensors", 2.0),
        ("C:\\loras\\a.safetensors", "C:\\loras\\a.safetensors", 1.0),  # the drive colon belongs to the path
        ("C:/loras/a.safetensors", "C:/loras/a.safetensors", 1.0),
        ("C:\\loras\\a.safetensors:0.5", "C:\\loras\\a.safetensors", 0.5),
        (":0.5", ":0.5", 1.0),  # nothing before the colon: not FILE:WEIGHT
    ],
)
def test_parse_spec(text, path, weight):
    assert parse_spec(text) == LoraSpec(Path(path), weight)


@pytest.mark.parametrize(
    "text,message",
    [
        ("a.safetensors:abc", "LoRA a.safetensors:abc: weight 'abc' is not a number and no file has that name"),
        ("a.safetensors:", "weight '' is not a number"),
        ("a.safetensors:nan", "LoRA a.safetensors:nan: weight nan is not a finite number"),
        ("a.safetensors:inf", "weight inf is not a finite number"),
        ("a.safetensors:-Infinity", "weight -inf is not a finite number"),
    ],
)
def test_parse_spec_refuses_bad_weights(text, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_spec(text)


def test_an_existing_file_with_a_colon_is_a_path(tmp_path):
    for name in ("odd:abc", "odd.safetensors:2"):
        (tmp_path / name).write_bytes(b"")
        assert parse_spec(str(tmp_path / name)) == (tmp_path / name, 1.0)


def test_python_api_pairs_are_checked_too():
    assert parse_spec((Path("a.safetensors"), -1)) == (Path("a.safetensors"), -1.0)
    with pytest.raises(InputError, match="not a finite number"):
        parse_spec(("a.safetensors", float("nan")))


# ---- read: fit, finiteness, floating point, hash ---------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    """A good LoRA (UNet, convs, both text encoders), a damaged copy (one NaN factor) and one for another base."""
    root = tmp_path_factory.mktemp("reader")
    keymap = keymap_for(base.unet)
    write_lora(random_network(base, seed=1), root / "good.safetensors", keymap=keymap, dtype=torch.float32)
    nan = random_network(base, seed=1)
    m = list(nan)[5]
    m.up = torch.full_like(m.up, float("nan"))
    write_lora(nan, root / "nan.safetensors", keymap=keymap, dtype=torch.float32)
    wrong = random_network(base, seed=2, te=False)
    m = next(iter(wrong))
    wrong.add(LoraModule(m.component, m.path, torch.zeros(2, m.down.shape[1] * 2, *m.down.shape[2:]), m.up, 2.0))
    write_lora(wrong, root / "wrong.safetensors", keymap=keymap)
    return root


def test_read_checks_and_hashes(base, files, tiny_models):
    from loratool.files import sha256

    good = files / "good.safetensors"
    lora = read(f"{good}:-0.5", ModelIndex.of_pipeline(base))
    assert (lora.path, lora.weight, lora.sha256) == (good, -0.5, sha256(good))
    folder = model_index(str(tiny_models / "base"))  # configs on the meta device: the same index as the pipeline
    assert folder.shapes == ModelIndex.of_pipeline(base).shapes
    assert len(read(good, folder).network) == len(lora.network)


def test_read_refuses_non_finite_alpha_and_integer_factors(base, files, tmp_path):
    from safetensors.torch import load_file, save_file

    index = ModelIndex.of_pipeline(base)
    tensors = load_file(files / "good.safetensors")
    alpha = next(k for k in tensors if k.endswith(".alpha"))
    save_file(tensors | {alpha: torch.tensor(float("inf"))}, tmp_path / "alpha.safetensors")
    with pytest.raises(LoraFileError, match="alpha contains NaN or inf"):
        read(str(tmp_path / "alpha.safetensors"), index)
    ints = {k: v.to(torch.int32) if k.endswith("weight") else v for k, v in tensors.items()}
    save_file(ints, tmp_path / "int.safetensors")
    with pytest.raises(LoraFileError, match="not floating point"):
        read(str(tmp_path / "int.safetensors"), index)


# ---- every verb refuses the same bad file with the same message --------------------------------------------

BAD = {
    "non-finite": ("nan.safetensors", "contains NaN or inf: the file is damaged"),
    "another base": ("wrong.safetensors", "this LoRA was made for another base model"),
    "bad weight": ("good.safetensors:abc", "weight 'abc' is not a number"),
    "nan weight": ("good.safetensors:nan", "weight nan is not a finite number"),
}


def _verbs(tiny: Path, spec: str, out: Path, image: Path) -> dict[str, list]:
    model = ["--model", tiny / "base"]
    return {
        "merge": ["merge", spec, "-o", out / "m.safetensors", *model],
        "merge --into-base": ["merge", spec, "-o", out / "folded", *model, "--into-base"],
        "train --base-lora": ["train", image, "--base-lora", spec, "-o", out / "t.safetensors", *model]
        + ["--steps", "1", "--resolution", "64", "--check-every", "0"],
        "sample --lora": ["sample", "--lora", spec, "-o", out / "s", *model, "--refiner", "none", "--steps", "1"],
        "inspect": ["inspect", spec, *model],
    }


@pytest.mark.parametrize("case", list(BAD))
def test_every_verb_refuses_the_same_bad_file_with_the_same_message(case, cli, files, tiny_models, tmp_path):
    name, expected = BAD[case]
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    out = tmp_path / "out"
    out.mkdir()
    messages = {}
    for verb, args in _verbs(tiny_models, str(files / name), out, image).items():
        code, stdout, stderr = cli(*args)
        assert code == 1, (verb, stdout, stderr)
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, (verb, stderr)
        messages[verb] = stderr.strip()
    assert expected in messages["merge"], messages["merge"]
    assert len(set(messages.values())) == 1, messages
    assert not list(out.iterdir())  # nothing written by any verb


def test_checking_against_a_folder_keeps_its_token_ids(tiny_models):
    """The meta text encoders carry the folder's token ids: CLIP's defaults (49406/49407) lie outside a
    small vocabulary and transformers warns on stderr about them (a library warning in a normal run)."""
    from loratool.sdxl.reference import meta_components

    _, te1, te2 = meta_components(str(tiny_models / "base"))
    for encoder in (te1, te2):
        config = encoder.config
        assert 0 <= config.bos_token_id < config.vocab_size and 0 <= config.eos_token_id < config.vocab_size
