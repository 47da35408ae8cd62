"""Which modules a LoRA covers by default: kohya's SDXL targets, as diffusers module paths."""

from __future__ import annotations

from loratool.errors import InputError

TRANSFORMER = "Transformer2DModel"
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# The UNet's three groups of blocks by their diffusers prefix (kohya: input_blocks, middle_block, output_blocks).
UNET_BLOCKS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


def unet_targets(unet, conv: bool = False) -> list[str]:
    """Every Linear inside the transformer blocks (proj_in/proj_out included): kohya's 722 modules on SDXL.

    With `conv`, also every layer of the ResNet blocks and down/up-samplers (LoCon): 3×3 convs get the
    conv rank, linears and 1×1 convs the linear rank (see `is_conv3x3`).
    """
    import torch

    wanted = (TRANSFORMER, *CONV_BLOCKS) if conv else (TRANSFORMER,)
    names: list[str] = []
    for name, module in unet.named_modules():
        if type(module).__name__ not in wanted:
            continue
        for child, layer in module.named_modules():
            if child and isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) and "lora_" not in child:
                names.append(f"{name}.{child}")
    return sorted(set(names))


def text_targets(text_encoder) -> list[str]:
    """The attention projections of every CLIP layer, in classic `text_model.` paths."""
    names = [n for n, _ in text_encoder.named_modules() if n.rsplit(".", 1)[-1] in TEXT_TARGETS]
    return [n if n.startswith("text_model.") else "text_model." + n for n in names]


def is_conv3x3(layer) -> bool:
    return getattr(layer, "kernel_size", (1, 1)) != (1, 1)


def parse_blocks(text: str | list[str]) -> list[str]:
    """`--blocks up` / `down,mid`: which UNet block groups to keep, checked, in UNET_BLOCKS order."""
    given = [b.strip() for b in (text.split(",") if isinstance(text, str) else text) if b.strip()]
    wrong = [b for b in given if b not in UNET_BLOCKS]
    if wrong or not given:
        raise InputError(f"--blocks takes a comma-separated subset of {', '.join(UNET_BLOCKS)}, not {text!r}.")
    return [b for b in UNET_BLOCKS if b in given]


def in_blocks(path: str, blocks: list[str]) -> bool:
    """Whether a UNet module path lies in one of `blocks` (conv_in, time embeddings and the like lie in none)."""
    return any(path.startswith(UNET_BLOCKS[b]) for b in blocks)
