"""Which modules a LoRA covers by default: kohya's SDXL targets, as diffusers module paths."""

from __future__ import annotations

TRANSFORMER = "Transformer2DModel"
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


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
