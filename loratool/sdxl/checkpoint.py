"""Single-file (A1111/ComfyUI, SGM layout) SDXL checkpoints: recognise them and write them.

Reading is diffusers' `from_single_file`; writing is its inverse, so a merged model or the tiny test
model can be exported and loaded back by every UI. UNet names come from `lora.keys.UnetPaths`.
"""

from __future__ import annotations

import re
from pathlib import Path

from loratool.errors import ModelSourceError
from loratool.lora.keys import UnetPaths

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Where each text encoder lives in an SGM checkpoint: (base, refiner).
TE1 = "conditioner.embedders.0.transformer."
TE2_BASE = "conditioner.embedders.1.model."
TE2_REFINER = "conditioner.embedders.0.model."
OPENCLIP_RENAMES = (
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    (".self_attn.", ".attn."),
)
VAE_RESNET_RENAMES = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTN_RENAMES = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def checkpoint_kind(keys: set[str]) -> str:
    """'sdxl-base', 'sdxl-refiner', 'sd1', 'sd2' or 'unknown' from a single file's key names."""
    if any(k.startswith(TE2_BASE) for k in keys):
        return "sdxl-base"
    if any(k.startswith(TE2_REFINER) for k in keys):
        return "sdxl-refiner"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    return "unknown"


def read_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as exc:  # safetensors raises several types for a bad header
        raise ModelSourceError(f"{path} is not a readable .safetensors checkpoint ({exc}).") from exc


def _unet_state(unet) -> dict:
    paths = UnetPaths.from_config(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        out[f"{UNET}{paths.to_sgm(module)}.{param}"] = value
    return out


def _vae_state(vae) -> dict:
    n = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        sgm = key.replace("conv_norm_out", "norm_out")
        sgm = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", sgm)
        sgm = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", sgm)
        # LDM numbers decoder blocks from the bottom: diffusers up_blocks.i is up.(n-1-i).
        sgm = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", sgm)
        sgm = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.",
            sgm,
        )
        sgm = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", sgm)
        if ".block." in sgm or ".block_" in sgm:
            for old, new in VAE_RESNET_RENAMES:
                sgm = sgm.replace(f".{old}.", f".{new}.")
        if "mid_block.attentions.0." in sgm:
            sgm = sgm.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, new in VAE_ATTN_RENAMES:
                sgm = sgm.replace(f".{old}.", f".{new}.")
            if value.ndim == 2:  # LDM keeps the mid attention projections as 1x1 convs
                value = value[:, :, None, None]
        out[VAE + sgm] = value
    return out


def clip_state(te) -> dict:
    """A CLIP text model's state dict in the classic `text_model.` layout.

    transformers >= 5.6 flattens CLIPTextModel (no `text_model.` level); checkpoints and LoRA files keep it.
    """
    state = {k: v for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    keep = ("text_model.", "text_projection.")
    return {(k if k.startswith(keep) else "text_model." + k): v for k, v in state.items()}


def _openclip_state(te, prefix: str) -> dict:
    import torch

    state = clip_state(te)
    out = {}
    for key, value in state.items():
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            kind = key.rsplit(".", 1)[1]
            stem = key[: -len(f"q_proj.{kind}")]
            value = torch.cat([state[f"{stem}{p}_proj.{kind}"] for p in "qkv"])
            key = f"{stem}in_proj_{kind}"
        elif re.search(r"[kv]_proj\.(weight|bias)$", key):
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        sgm = key.replace("text_model.embeddings.position_embedding.weight", "positional_embedding")
        sgm = sgm.replace("text_model.embeddings.token_embedding.", "token_embedding.")
        sgm = sgm.replace("text_model.final_layer_norm.", "ln_final.")
        for old, new in OPENCLIP_RENAMES:
            sgm = sgm.replace(old, new)
        out[prefix + sgm] = value
    return out


def pipeline_state_dict(pipe) -> dict:
    """SGM-layout state dict of an SDXL base or refiner pipeline (fp32 or the pipeline's dtype)."""
    refiner = getattr(pipe, "text_encoder", None) is None
    state = _unet_state(pipe.unet) | _vae_state(pipe.vae)
    if refiner:
        state |= _openclip_state(pipe.text_encoder_2, TE2_REFINER)
    else:
        state |= {TE1 + k: v for k, v in clip_state(pipe.text_encoder).items()}
        state |= _openclip_state(pipe.text_encoder_2, TE2_BASE)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_single_file(pipe, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `pipe` as one SGM-layout .safetensors file (atomically)."""
    from safetensors.torch import save_file

    from loratool.files import atomic_path

    with atomic_path(Path(path)) as tmp:
        save_file(pipeline_state_dict(pipe), str(tmp), metadata=metadata or {})
