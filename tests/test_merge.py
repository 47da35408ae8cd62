import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.lora.apply import add_adapter
from loratool.lora.io import keymap_for, read_lora, write_lora
from loratool.lora.network import LoraNetwork
from tests.test_lora_files import random_network


@pytest.fixture(scope="module")
def base(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pair(base, tiny_models, tmp_path_factory):
    """A: kohya rank 2–4 with convs and text encoders; B: diffusers format, other seed, UNet subset only."""
    root = tmp_path_factory.mktemp("pair")
    keymap = keymap_for(base.unet)
    a = random_network(base, seed=1)
    b_full = random_network(base, seed=2, conv=False, te=False)
    b = LoraNetwork({k: m for i, (k, m) in enumerate(b_full.modules.items()) if i % 3})
    write_lora(a, root / "a.safetensors", keymap=keymap)
    write_lora(b, root / "b.safetensors", keymap=keymap, fmt="diffusers")
    return root, a, b


def _merge(cli, tiny_models, out, *args):
    code, stdout, stderr = cli("merge", *args, "-o", out, "--model", tiny_models / "base", "--dtype", "fp32")
    assert code == 0, stderr
    return stderr


def _relerr(x, y):
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def test_svd_merge_is_exact_per_module(cli, tiny_models, pair, base, tmp_path):
    root, a, b = pair
    stderr = _merge(cli, tiny_models, tmp_path / "s.safetensors", root / "a.safetensors:1", root / "b.safetensors:-1")
    assert "merged" in stderr and "max relative error" in stderr
    merged = read_lora(tmp_path / "s.safetensors", keymap_for(base.unet))
    assert merged.modules.keys() == a.modules.keys() | b.modules.keys()
    assert len(merged.alphas()) == 1 and merged.metadata["ss_network_alpha"] != "Dynamic"  # one uniform alpha
    for key, m in merged.modules.items():
        want = a.modules[key].delta() if key in a.modules else 0
        want = want - (b.modules[key].delta() if key in b.modules else 0)
        assert _relerr(m.delta(), want) <= 1e-5, key
        rank_in = (a.modules[key].rank if key in a.modules else 0) + (b.modules[key].rank if key in b.modules else 0)
        assert m.rank == rank_in  # double rank


def test_blocks_keeps_the_up_blocks_exactly_and_the_text_encoders(cli, tiny_models, pair, base, tmp_path):
    """`--blocks up` (a slider that keeps the layout): the up blocks' ΔW as merged, no other UNet module."""
    from safetensors import safe_open

    root, a, b = pair
    args = [root / "a.safetensors:1", root / "b.safetensors:-1", "--blocks", "up"]
    stderr = _merge(cli, tiny_models, tmp_path / "up.safetensors", *args)
    assert "--blocks up: left out" in stderr
    merged = read_lora(tmp_path / "up.safetensors", keymap_for(base.unet))
    every = a.modules.keys() | b.modules.keys()
    want = {k for k in every if k[0] != "unet" or k[1].startswith("up_blocks.")}
    assert merged.modules.keys() == want and any(k[0] != "unet" for k in want) and len(want) < len(every)
    for key, m in merged.modules.items():
        delta = (a.modules[key].delta() if key in a.modules else 0) - (
            b.modules[key].delta() if key in b.modules else 0
        )
        assert _relerr(m.delta(), delta) <= 1e-5, key
    with safe_open(str(tmp_path / "up.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["loratool_recipe"])["blocks"] == ["up"]


@pytest.mark.parametrize(
    "text,expected", [("up", ["up"]), ("up, down", ["down", "up"]), ("mid,down,up", ["down", "mid", "up"])]
)
def test_blocks_are_parsed_in_unet_order(text, expected):
    from loratool.lora.targets import in_blocks, parse_blocks

    assert parse_blocks(text) == expected
    assert in_blocks("up_blocks.0.attentions.1.proj_in", ["up"]) and not in_blocks(
        "mid_block.attentions.0.proj_in", ["up"]
    )
    assert not in_blocks("conv_in", expected) and not in_blocks("up_blocksX.0", ["up"])


def _images(pipe, adapters, weights):
    pipe.set_adapters(adapters, adapter_weights=weights)
    return pipe("", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)).images


def test_slider_images_equal_two_adapters(cli, tiny_models, pair, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    root, a, b = pair
    _merge(cli, tiny_models, tmp_path / "s.safetensors", root / "a.safetensors:1", root / "b.safetensors:-1")
    _merge(
        cli, tiny_models, tmp_path / "c.safetensors", root / "a.safetensors:1", root / "b.safetensors:-1", "--concat"
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    pipe.set_progress_bar_config(disable=True)
    keymap = keymap_for(pipe.unet)
    for name, net in (("pa", a), ("pb", b)):
        for component, model in (("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
            add_adapter(model, net, component, name)
    for name, file in (("slider", "s"), ("concat", "c")):
        net = read_lora(tmp_path / f"{file}.safetensors", keymap)
        for component, model in (("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
            add_adapter(model, net, component, name)
    for s in (0.5, -1.0):
        two = _images(pipe, ["pa", "pb"], [s, -s])
        assert (_images(pipe, ["slider"], [s]) - two).abs().max() <= 1e-4
        assert (_images(pipe, ["concat"], [s]) - two).abs().max() <= 1e-4


def test_truncation_reports_error_and_energy(cli, tiny_models, pair, tmp_path):
    root, _, _ = pair
    out, report = tmp_path / "t.safetensors", tmp_path / "r.json"
    _merge(
        cli, tiny_models, out, root / "a.safetensors:1", root / "b.safetensors:-1", "--rank", "2", "--report", report
    )
    rows = json.loads(report.read_text())["modules"]
    assert all(r["rank"] <= 2 for r in rows)
    assert any(r["rel_error"] > 1e-3 for r in rows)
    assert all(abs(r["rel_error"] ** 2 + r["retained_energy"] - 1) < 1e-4 for r in rows)


def test_dynamic_rank_differs_per_module_and_is_recorded(cli, tiny_models, pair, base, tmp_path):
    root, _, _ = pair
    out = tmp_path / "d.safetensors"
    _merge(cli, tiny_models, out, root / "a.safetensors:1", root / "b.safetensors:-1", "--sv-fro", "0.9")
    net = read_lora(out, keymap_for(base.unet))
    assert len(net.ranks()) > 1 and net.metadata["ss_network_dim"] == "Dynamic"
    # one alpha, the most common rank: diffusers' alpha_pattern would misread per-module alphas
    most_common = max(net.ranks(), key=lambda r: (sum(m.rank == r for m in net), r))
    assert net.alphas() == [float(most_common)] and net.metadata["ss_network_alpha"] == str(most_common)


def test_self_cancelling_modules_are_dropped(cli, tiny_models, pair, base, tmp_path):
    root, a, b = pair
    keymap = keymap_for(base.unet)
    part = LoraNetwork({k: m for i, (k, m) in enumerate(a.modules.items()) if i % 2})
    write_lora(part, tmp_path / "part.safetensors", keymap=keymap)
    stderr = _merge(
        cli, tiny_models, tmp_path / "x.safetensors", root / "a.safetensors:1", tmp_path / "part.safetensors:-1"
    )
    assert "dropped" in stderr
    merged = read_lora(tmp_path / "x.safetensors", keymap)
    assert merged.modules.keys() == a.modules.keys() - part.modules.keys()
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "x.safetensors").values())


def test_into_base_renders_like_loras_at_weights(cli, tiny_models, pair, base, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    root, a, b = pair
    code, _, err = cli(
        "merge",
        root / "a.safetensors:0.7",
        root / "b.safetensors:-0.5",
        "--into-base",
        "--model",
        tiny_models / "base",
        "-o",
        tmp_path / "merged",
        "--dtype",
        "fp32",
    )
    assert code == 0, err
    merged = StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged")
    merged.set_progress_bar_config(disable=True)
    got = merged("", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    pipe.set_progress_bar_config(disable=True)
    for name, net in (("pa", a), ("pb", b)):
        for component, model in (("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
            add_adapter(model, net, component, name)
    assert (got - _images(pipe, ["pa", "pb"], [0.7, -0.5])).abs().max() <= 1e-4


def _fails(cli, tiny_models, tmp_path, message, *inputs):
    out = tmp_path / "out.safetensors"
    code, stdout, err = cli("merge", *inputs, "-o", out, "--model", tiny_models / "base")
    assert code == 1, (stdout, err)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_inputs(cli, tiny_models, pair, base, tmp_path):
    root, a, _ = pair
    A = root / "a.safetensors"
    _fails(cli, tiny_models, tmp_path, "not found", A, tmp_path / "missing.safetensors:-1")
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    _fails(cli, tiny_models, tmp_path, "not a readable", A, tmp_path / "bad.safetensors:-1")
    _fails(cli, tiny_models, tmp_path, "is not a number", A, f"{A}:minus")
    sd = load_file(A)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    nan = dict(sd) | {key: torch.full_like(sd[key], float("nan"))}
    save_file(nan, tmp_path / "nan.safetensors", metadata={})
    _fails(cli, tiny_models, tmp_path, "NaN or inf", A, tmp_path / "nan.safetensors")
    wrong = dict(sd) | {key: torch.zeros(sd[key].shape[0] + 2, sd[key].shape[1])}
    save_file(wrong, tmp_path / "wrong.safetensors")
    _fails(cli, tiny_models, tmp_path, "another base model", A, tmp_path / "wrong.safetensors")
    _fails(cli, tiny_models, tmp_path, "every merged module is zero", A, f"{A}:-1")
    _fails(cli, tiny_models, tmp_path, "--blocks takes a comma-separated subset", A, "--blocks", "output")
    down = LoraNetwork({k: m for k, m in a.modules.items() if k[0] == "unet" and k[1].startswith("down_blocks.")})
    write_lora(down, tmp_path / "down.safetensors", keymap=keymap_for(base.unet))
    _fails(
        cli, tiny_models, tmp_path, "none of the inputs' modules lie", tmp_path / "down.safetensors", "--blocks", "up"
    )


def test_fp16_overflow_is_refused(cli, tiny_models, base, tmp_path):
    net = random_network(base, conv=False, te=False)
    for m in net:
        m.up = m.up * 1e5
        m.down = m.down * 1e5
    write_lora(net, tmp_path / "big.safetensors", keymap=keymap_for(base.unet))
    code, _, err = cli(
        "merge",
        tmp_path / "big.safetensors",
        tmp_path / "big.safetensors:0.5",
        "-o",
        tmp_path / "o.safetensors",
        "--model",
        tiny_models / "base",
    )
    assert code == 1 and "overflows" in err and not (tmp_path / "o.safetensors").exists()
