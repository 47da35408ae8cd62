"""Files from the tools our users have, read exactly; files we write, loaded exactly by diffusers; quiet runs.

Producer files are built here from each producer's own key names, spelled out below rather than taken from
`lora.keys` (that module is what is under test), at real SDXL 1.0 shapes from the shipped layer index.
Assumptions about producers, from their sources as we know them:
- diffusers <= 0.24 SDXL dreambooth script: UNet `unet.<path>.lora.down.weight` (LoRACompatibleLinear),
  text encoders `text_encoder.text_model.….lora_linear_layer.down.weight`; no alphas (scale 1).
- diffusers attention processors (LoRAAttnProcessor, before 0.21): `…attn1.processor.to_q_lora.down.weight`,
  text encoders `…self_attn.to_q_lora.down.weight`; scale 1.
- diffusers >= 0.25 + PEFT: `unet.<path>.lora_A.weight`; alphas only in the `lora_adapter_metadata` header
  (peft LoraConfig fields prefixed `unet.`/`text_encoder.`/`text_encoder_2.`). transformers 5 drops CLIPTextModel's
  `text_model.` level, so text encoder 1 is written `text_encoder.encoder.layers.…`.
- PEFT's own `get_peft_model_state_dict` of a UNet: `base_model.model.<path>.lora_A.weight`, no alpha.
- SimpleTuner's LyCORIS on a diffusers UNet: `lycoris_<path with _>.lora_down.weight|lora_up.weight|alpha`.
"""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from loratool.lora.io import keymap_for, read_lora, write_lora
from loratool.lora.network import LoraModule, LoraNetwork
from loratool.sdxl.index import model_index, read
from tests.test_lora_files import random_network

ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
TEXT = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


@pytest.fixture(scope="module")
def sdxl():
    return model_index(None)


def _producer_modules(sdxl, convs: bool, text: bool, attention_only: bool = False):
    """(component, path, shape) of kohya's 722 UNet modules (+ LoCon convs) and the CLIP attention projections."""
    wanted = []
    for (component, path), shape in sorted(sdxl.shapes.items()):
        leaf = path.rsplit(".", 1)[-1]
        if component == "unet":
            is_attn = ".attentions." in path and (
                not attention_only or re.search(r"attn[12]\.(to_[qkv]|to_out\.0)$", path)
            )
            is_conv = convs and re.search(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)|samplers\.0\.conv)$", path)
            if is_attn or is_conv:
                wanted.append((component, path, shape))
        elif text and leaf in TEXT:
            wanted.append((component, path, shape))
    return wanted


def _factors(shape, rank, g):
    down = torch.randn((rank, *shape[1:]), generator=g) * 0.1
    up = torch.randn((shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank), generator=g) * 0.1
    return down, up


def _flat(path):
    return path.replace(".", "_")


def build(layout: str, sdxl):
    """→ (tensors, metadata, {(component, path): (down, up, scale the producer meant)})."""
    g = torch.Generator().manual_seed(zlib.crc32(layout.encode()))
    convs, text = layout in ("lycoris",), layout not in ("lycoris", "peft_bare")
    modules = _producer_modules(sdxl, convs, text, attention_only=layout == "attn_processors")
    tensors, intent, meta = {}, {}, {}
    prefix = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
    for i, (component, path, shape) in enumerate(modules):
        rank = 1 + i % 3
        down, up = _factors(shape, rank, g)
        scale = 1.0
        if layout == "diffusers_old":
            which = ".lora" if component == "unet" else ".lora_linear_layer"
            names = [f"{prefix[component]}{path}{which}.{x}.weight" for x in ("down", "up")]
        elif layout == "attn_processors":
            head, leaf = re.match(r"(.+?)\.(to_[qkv]|to_out\.0|[qkv]_proj|out_proj)$", path).groups()
            if component == "unet":
                names = [f"unet.{head}.processor.{ATTN[leaf]}_lora.{x}.weight" for x in ("down", "up")]
            else:
                names = [f"{prefix[component]}{head}.{TEXT[leaf]}_lora.{x}.weight" for x in ("down", "up")]
        elif layout in ("peft_tf4", "peft_tf5"):
            written = path.removeprefix("text_model.") if layout == "peft_tf5" and component == "te1" else path
            names = [f"{prefix[component]}{written}.lora_{x}.weight" for x in ("A", "B")]
            scale = 2.0 * 4 / rank  # lora_alpha 8 for every module (r=4 is the config's default rank)
        elif layout == "peft_bare":
            names = [f"base_model.model.{path}.lora_{x}.weight" for x in ("A", "B")]
        elif layout == "lycoris":
            names = [f"lycoris_{_flat(path)}.lora_{x}.weight" for x in ("down", "up")]
            alpha = float(rank) / 2 if i % 2 else 1.0
            tensors[f"lycoris_{_flat(path)}.alpha"] = torch.tensor(alpha)
            scale = alpha / rank
        tensors[names[0]], tensors[names[1]] = down, up
        intent[(component, path)] = (down, up, scale)
    if layout.startswith("peft_tf"):
        config = {"r": 4, "lora_alpha": 8, "rank_pattern": {}, "alpha_pattern": {}}
        packed = {f"{p}.{k}": v for p in ("unet", "text_encoder", "text_encoder_2") for k, v in config.items()}
        # one module with its own alpha, addressed as peft does: a suffix of the module name
        first_te1 = next(p for c, p in intent if c == "te1")
        packed["text_encoder.alpha_pattern"] = {first_te1.removeprefix("text_model."): 1.0}
        down, up, _ = intent[("te1", first_te1)]
        intent[("te1", first_te1)] = (down, up, 1.0 / down.shape[0])
        meta["lora_adapter_metadata"] = json.dumps(packed)
    return tensors, meta, intent


def _probe_error(module: LoraModule, down, up, scale, g) -> float:
    """‖ΔW x − ΔW' x‖/‖ΔW' x‖ on random x: equal ΔW without building SDXL-size dense matrices."""
    x = torch.randn(down[0].numel(), 4, generator=g, dtype=torch.float64)
    mine = module.scale * module.up.double().flatten(1) @ (module.down.double().flatten(1) @ x)
    want = scale * up.double().flatten(1) @ (down.double().flatten(1) @ x)
    return float((mine - want).norm() / want.norm())


@pytest.mark.parametrize(
    "layout,fmt",
    [
        ("diffusers_old", "diffusers-old"),
        ("attn_processors", "diffusers-old"),
        ("peft_tf4", "diffusers"),
        ("peft_tf5", "diffusers"),
        ("peft_bare", "peft"),
        ("lycoris", "lycoris"),
    ],
)
def test_producer_layouts_are_read_exactly_at_sdxl_shapes(sdxl, tmp_path, layout, fmt):
    tensors, meta, intent = build(layout, sdxl)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "p.safetensors", metadata=meta)
    lora = read(str(tmp_path / "p.safetensors"), sdxl)  # the one reader: parses, fits SDXL shapes, checks numbers
    assert lora.network.source_format == fmt
    assert set(lora.network.modules) == set(intent)  # every module matched, none invented
    g = torch.Generator().manual_seed(0)
    worst = max(_probe_error(lora.network.modules[k], *intent[k], g) for k in intent)
    assert worst <= 1e-6
    if layout == "lycoris":
        assert any(m.is_conv and m.down.shape[-1] == 3 for m in lora.network)  # LoCon 3×3 convs matched too


def test_transformers5_and_4_text_encoder_keys_name_the_same_modules(sdxl):
    from loratool.lora import keys as K

    a = K.parse_diffusers_key("text_encoder.encoder.layers.3.self_attn.q_proj.lora_A.weight")
    b = K.parse_diffusers_key("text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_A.weight")
    assert a == b == ("te1", "text_model.encoder.layers.3.self_attn.q_proj", "down")
    assert K.parse_diffusers_key("unet.mid_block.attentions.0.proj_in.lora_A.default.weight")[2] == "down"
    assert K.parse_diffusers_key(
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight"
    ) == (
        "unet",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "up",
    )


@pytest.mark.parametrize(
    "key,looks",
    [
        ("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight", "FLUX.1 LoRA"),
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "diffusion-transformer LoRA"),
        ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", "Stable Diffusion 3"),
        ("clip_g", "textual-inversion embedding"),
        ("model.diffusion_model.input_blocks.0.0.weight", "full SD/SDXL checkpoint"),
    ],
)
def test_a_layout_we_do_not_read_is_named(cli, tmp_path, key, looks):
    save_file({key: torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    code, out, err = cli("inspect", tmp_path / "x.safetensors")
    assert code == 1 and looks in err and "another base model" not in err, err
    assert len(err.strip().splitlines()) == 1


# ---- what we write ---------------------------------------------------------------------------------------


def _locon(sdxl):
    """Linear/1×1 modules at rank 8 alpha 4, 3×3 convs at rank 4 alpha 2: an sd-scripts LoCon (conv_dim 4)."""
    g = torch.Generator().manual_seed(3)
    network = LoraNetwork()
    for component, path, shape in _producer_modules(sdxl, convs=True, text=False):
        rank, alpha = (4, 2.0) if len(shape) == 4 and shape[-1] == 3 else (8, 4.0)
        network.add(LoraModule(component, path, *_factors(shape, rank, g), alpha))
    return network


def test_metadata_modelspec_network_args_and_sshs_hashes(sdxl, tmp_path):
    path = tmp_path / "locon.safetensors"
    write_lora(_locon(sdxl), path, keymap=sdxl.keymap, metadata=sdxl.base_metadata(None))
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.title"] == "locon" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
    # A1111 (addnet_hash_safetensors) hashes the real file after its header: it must find sshs_model_hash.
    raw = path.read_bytes()
    assert hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest() == meta["sshs_model_hash"]
    # sd-scripts' legacy hash: bytes 0x100000..+0x10000 of the tensors saved with the ss_* metadata only.
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert len(ss_only) > 0x110000
    assert hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8] == meta["sshs_legacy_hash"]


def test_base_model_version_is_what_was_used(tiny_models, sdxl):
    tiny = model_index(str(tiny_models / "base"))
    assert sdxl.base_metadata(None)["ss_base_model_version"] == "sdxl_base_v1-0"
    described = tiny.base_metadata(str(tiny_models / "base"))
    assert described["ss_base_model_version"] == "sdxl_custom"
    assert described["ss_sd_model_name"] == str(tiny_models / "base")


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")


@pytest.fixture(scope="module")
def variable_rank(pipe, tiny_models, tmp_path_factory):
    """Our outputs as users get them: a variable-rank uniform-alpha LoRA and an SVD merge of two such."""
    from loratool.merge import MergeConfig
    from loratool.merge import run as merge

    root = tmp_path_factory.mktemp("ours")
    keymap = keymap_for(pipe.unet)
    a = random_network(pipe, seed=5)  # LoCon convs and both text encoders; ranks 2–4, alphas differ per module
    b = random_network(pipe, seed=6)
    write_lora(a, root / "a.safetensors", keymap=keymap)
    write_lora(b, root / "b.safetensors", keymap=keymap)
    files = {}
    for fmt in ("kohya", "diffusers"):
        files[f"single-{fmt}"] = root / f"single-{fmt}.safetensors"
        write_lora(
            LoraNetwork({k: m.with_alpha(4.0) for k, m in a.modules.items()}),
            files[f"single-{fmt}"],
            keymap=keymap,
            fmt=fmt,
        )
        files[f"merge-{fmt}"] = root / f"merge-{fmt}.safetensors"
        inputs = [(root / "a.safetensors", 1.0), (root / "b.safetensors", -0.5)]
        merge(
            MergeConfig(
                inputs, files[f"merge-{fmt}"], sv_fro=0.95, dtype="fp32", format=fmt, model=str(tiny_models / "base")
            )
        )
    return files


@pytest.mark.parametrize("name", ["single-kohya", "single-diffusers", "merge-kohya", "merge-diffusers"])
def test_diffusers_load_lora_weights_loads_every_module_at_our_strength(pipe, variable_rank, name, caplog):
    from loratool.lora.apply import model_path

    ours = read_lora(variable_rank[name], keymap_for(pipe.unet))
    assert len(ours.ranks()) > 1
    # kohya: one alpha for every module; diffusers: the scale lives in the factors (alpha = rank)
    assert len(ours.alphas()) == 1 if name.endswith("kohya") else all(m.alpha == m.rank for m in ours)
    adapter = name.replace("-", "_")
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(variable_rank[name]), adapter_name=adapter)
    assert not [
        r for r in caplog.records if re.search(r"unexpected|missing|not loaded|no lora keys", r.getMessage(), re.I)
    ]
    models = {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}
    loaded = sum(
        1 for model in models.values() for _, layer in model.named_modules() if adapter in getattr(layer, "lora_A", {})
    )
    assert loaded == len(ours)  # 0 unloaded keys, nothing extra
    worst = 0.0
    for m in ours:
        layer = models[m.component].get_submodule(model_path(models[m.component], m.component, m.path))
        got = layer.get_delta_weight(adapter).detach().float()  # peft's delta keeps the graph: a float of it warns
        worst = max(worst, float((got - m.delta()).norm() / m.delta().norm()))
    pipe.delete_adapters(adapter)
    assert worst <= 1e-6, worst


def test_bitsandbytes_is_kept_out_until_a_quantised_option_brings_it_back():
    # A fresh interpreter: CliRunner tests in this process have already marked bitsandbytes absent.
    code = (
        "import importlib.util as u; from loratool import libraries\n"
        "if u.find_spec('bitsandbytes') is None:\n    raise SystemExit('not installed')\n"
        "libraries.without_bitsandbytes(); assert u.find_spec('bitsandbytes') is None\n"
        "try:\n    import bitsandbytes\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('imported')\n"
        "libraries.with_bitsandbytes(); assert u.find_spec('bitsandbytes') is not None\n"
    )
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "not installed" not in done.stderr, "bitsandbytes is a dependency of loratool: the install is broken"
    assert done.returncode == 0, done.stderr


def test_train_then_merge_print_nothing_on_stderr_but_progress_and_results(tiny_models, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "img.png")
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "loratool"]
    train = [*run, "train", "img.png", "--model", str(tiny_models / "base"), "-o", "t.safetensors", "--steps", "2"]
    train += ["--resolution", "64", "--rank", "2", "--check-every", "0"]
    merge = [*run, "merge", "t.safetensors:1", "t.safetensors:-0.5", "-o", "m.safetensors"]
    merge += ["--model", str(tiny_models / "base")]
    allowed = re.compile(r"^(train .*\d+/\d+.*|wrote \S+|merged \d+ modules.*|kohya format: loads in .*)$")
    for command in (train, merge):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        noise = [line for line in done.stderr.splitlines() if line.strip() and not allowed.match(line.strip())]
        assert not noise, done.stderr
    assert (tmp_path / "m.safetensors").is_file()
