"""What outputs record, read back: the config that reproduces a run (`--config LORA.safetensors`), and the
base model a LoRA was made on (the default --model of the verbs that read it).

Reads the safetensors header as JSON: no torch, so a bad `--config` fails at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from loratool.errors import InputError
from loratool.options import read_toml

NOT_REPRODUCED = ("force", "resume")  # a recorded --force must not overwrite the next time without asking
# Settings a verb gained after its outputs first recorded configs (and checkpoints their settings): a record
# without one ran with this value, whatever today's default is.
ADDED_LATER = {"train": {"multires_noise": 0.0, "blocks": ["down", "mid", "up"], "vary": []}}


def config_file(path: Path, verb: str) -> dict:
    """`--config FILE` → settings: a TOML file as written, or the config recorded in a LoRA
    (train, merge), a train report (`*.report.json`) or a `sweep.json` (sample)."""
    if path.suffix == ".toml":
        return read_toml(path)
    if path.suffix == ".safetensors":
        recorded = _from_lora(path, verb)
    elif path.suffix == ".json":
        key = {"train": "settings", "sample": "config"}.get(verb)
        recorded = _read_json(path).get(key) if key else None
    else:
        raise InputError(f"--config {path}: give a .toml file, or a LoRA .safetensors / .json an output recorded.")
    if not isinstance(recorded, dict):
        raise InputError(f"--config {path} records no `loratool {verb}` config to reproduce.")
    recorded = ADDED_LATER.get(verb, {}) | recorded
    return {k: v for k, v in recorded.items() if k not in NOT_REPRODUCED}


def _from_lora(path: Path, verb: str) -> dict | None:
    meta = metadata(path)
    if meta is None:
        raise InputError(f"--config {path}: not a readable .safetensors file.")
    try:
        if verb == "train" and "loratool_config" in meta:
            return json.loads(meta["loratool_config"])
        recipe = json.loads(meta.get("loratool_recipe", "null"))
    except json.JSONDecodeError:
        return None
    if verb == "merge" and isinstance(recipe, dict) and recipe.pop("verb", None) == "merge":
        return recipe
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--config {path}: not a readable JSON file ({exc}).") from None
    return data if isinstance(data, dict) else {}


def metadata(path: Path) -> dict[str, str] | None:
    """A .safetensors file's `__metadata__` (8-byte little-endian header length, then the JSON header)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def base_model(path: Path) -> str | None:
    """The base model a LoRA file records, when it can be loaded here: the `demo` alias or a folder that exists.

    A hub id is not used: offline it would fail, and SDXL 1.0 base is every verb's default anyway.
    """
    model = (metadata(Path(path)) or {}).get("loratool_base_model")
    return model if model == "demo" or (model and Path(model).expanduser().is_dir()) else None
