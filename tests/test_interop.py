"""Files from the tools our users have, read exactly.

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

import json
import re
import zlib

import pytest
import torch
from safetensors.torch import save_file

from loratool.lora.network import LoraModule
from loratool.sdxl.index import model_index, read

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
