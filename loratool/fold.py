"""Folding weighted LoRAs into a base model's weights and writing the full model (seed approach 1)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)
COMPONENT_ATTRS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


def fold_loras(pipe, inputs: list[tuple[Path, float]]) -> dict[str, str]:
    """W += Σ wᵢ·ΔWᵢ in float32 over the UNet and both text encoders; returns the inputs' sha256s."""
    from loratool.files import sha256
    from loratool.lora.apply import fold_network, layer_shapes
    from loratool.lora.io import check_fits, keymap_for, read_lora

    keymap = keymap_for(pipe.unet)
    models = {c: getattr(pipe, a) for c, a in COMPONENT_ATTRS.items() if getattr(pipe, a, None) is not None}
    shapes = {}
    for component, model in models.items():
        shapes |= layer_shapes(model, component)
    hashes = {}
    for path, weight in inputs:
        network = read_lora(path, keymap)
        check_fits(network, shapes, str(path))
        for component, model in models.items():
            fold_network(model, network, component, weight)
        hashes[str(path)] = sha256(path)
    return hashes


def fold_into_base(config) -> Path:
    """`merge --into-base`: load the base in float32, fold, write a diffusers folder or a single file."""
    import torch

    from loratool.files import atomic_path
    from loratool.sdxl.checkpoint import save_single_file
    from loratool.sdxl.models import load_pipeline, pick_runtime

    runtime = pick_runtime(None, "fp32")  # folding in half precision would round small deltas away
    pipe = load_pipeline(config.model, runtime, config=config.model_config)
    hashes = fold_loras(pipe, config.inputs)
    if config.dtype != "fp32":
        pipe.to(dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[config.dtype])
    meta = {
        "loratool_recipe": json.dumps(
            {"verb": "merge --into-base", "model": config.model, "inputs": [[str(p), w] for p, w in config.inputs]}
        ),
        "loratool_inputs_sha256": json.dumps(hashes),
    }
    output = Path(config.output)
    if output.suffix == ".safetensors":
        save_single_file(pipe, output, metadata=meta)  # atomic itself
    else:
        with atomic_path(output, force=config.force) as tmp:
            pipe.save_pretrained(tmp)
            (tmp / "loratool.json").write_text(json.dumps(meta, indent=1))
    log.info("folded %d LoRA(s) into %s → %s", len(config.inputs), config.model, output)
    return output
