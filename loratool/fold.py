"""Folding weighted LoRAs into a base model's weights and writing the full model (seed approach 1)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from loratool.lora.apply import fold_network
from loratool.lora.network import COMPONENT_MODELS
from loratool.sdxl.index import LoraSpec, ModelIndex, read

log = logging.getLogger(__name__)


def fold_loras(pipe, inputs: list[LoraSpec]) -> dict[str, str]:
    """W += Σ wᵢ·ΔWᵢ in float32 over the UNet and both text encoders; returns the inputs' sha256s."""
    index = ModelIndex.of_pipeline(pipe)
    loras = [read(spec, index) for spec in inputs]  # every file checked before the first (slow) fold
    models = {c: getattr(pipe, a) for c, a in COMPONENT_MODELS.items() if getattr(pipe, a, None) is not None}
    for lora in loras:
        for component, model in models.items():
            fold_network(model, lora.network, component, lora.weight)
    return {str(lora.path): lora.sha256 for lora in loras}


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
