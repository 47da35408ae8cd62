"""The real SDXL 1.0 component configs (from the stabilityai repos), as data.

With no hub here, these let us build full-size SDXL on the `meta` device (key maps, validation, counting
kohya's 722 modules) or random-init on a GPU for benchmarks. Only keys that differ from the diffusers
defaults are listed.
"""

from __future__ import annotations

import json
from pathlib import Path

from loratool.errors import ModelSourceError
from loratool.sdxl.models import resolve_alias

BASE_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

REFINER_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [384, 768, 1536, 1536],
    "layers_per_block": 2,
    "transformer_layers_per_block": 4,
    "attention_head_dim": [6, 12, 24, 24],
    "cross_attention_dim": 1280,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2560,
}

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

TEXT_ENCODER = {  # CLIP ViT-L/14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14 text tower
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


BASE_INDEX = Path(__file__).with_name("sdxl_base_layers.json")


def base_model_version(unet_config) -> str:
    """`ss_base_model_version` for a LoRA made on a UNet with this config, as sd-scripts names versions.

    Any UNet with SDXL 1.0 base's architecture (base or a fine-tune) is `sdxl_base_v1-0`, as sd-scripts writes;
    other SDXL-family UNets (the refiner, the demo model) are `sdxl_custom`: the `sdxl_` prefix still tells
    A1111 the family, without claiming a base the LoRA would not fit.
    """

    def norm(v):
        return list(v) if isinstance(v, list | tuple) else v

    same = all(norm(unet_config.get(k)) == norm(v) for k, v in BASE_UNET.items())
    return "sdxl_base_v1-0" if same else "sdxl_custom"


def load_base_index() -> dict[tuple[str, str], tuple[int, ...]]:
    """{(component, path): weight shape} of every Linear/Conv2d of SDXL 1.0 base (UNet and both encoders).

    Shipped as data and checked against a fresh meta-device build by the tests, so it cannot go stale
    (`python -m loratool.sdxl.index` regenerates it).
    """
    raw = json.loads(BASE_INDEX.read_text())
    return {(c, p): tuple(shape) for c, layers in raw.items() for p, shape in layers.items()}


def meta_unet(config: dict):
    """A UNet with no storage (meta device): module names and shapes for free."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def meta_text_encoder(config: dict, projection: bool):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        return cls(CLIPTextConfig(**config))


def meta_components(source: str | None):
    """(unet, text_encoder, text_encoder_2) on the meta device for a diffusers folder, or real SDXL if None.

    Validating a LoRA needs names and shapes only: no weights are read.
    """
    if source is None:
        return meta_unet(BASE_UNET), meta_text_encoder(TEXT_ENCODER, False), meta_text_encoder(TEXT_ENCODER_2, True)
    root = Path(resolve_alias(source)).expanduser()
    if not (root / "unet" / "config.json").is_file():
        raise ModelSourceError(f"--model {source}: give a diffusers folder (with unet/config.json) to check against.")
    unet_config = json.loads((root / "unet" / "config.json").read_text())
    unet = meta_unet({k: v for k, v in unet_config.items() if not k.startswith("_")})
    encoders = []
    for sub, projection in (("text_encoder", False), ("text_encoder_2", True)):
        path = root / sub / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else None
        # the token ids too: CLIP's defaults lie outside a small vocabulary and transformers warns about it
        names = (*TEXT_ENCODER, "bos_token_id", "eos_token_id", "pad_token_id")
        keep = {k: config[k] for k in names if config and k in config}
        encoders.append(meta_text_encoder(keep, projection) if config else None)
    return unet, *encoders
