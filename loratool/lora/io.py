"""Reading every common SDXL LoRA file format and writing kohya or diffusers files, with metadata.

Formats are detected from the keys; names are translated by `lora.keys` only. Nothing is dropped
silently: unknown or unsupported keys are an error that lists them.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from loratool import __version__
from loratool.errors import LoraFileError
from loratool.lora import keys as K
from loratool.lora.network import LoraModule, LoraNetwork

UNSUPPORTED = {
    "dora_scale": "DoRA (dora_scale)",
    "hada_": "LoHa (hada_*)",
    "lokr_": "LoKr (lokr_*)",
    ".diff": "full weight differences (diff)",  # a key suffix (.diff, .diff_b): model.diffusion_model is not one
    "lora_mid": "LoCon Tucker (lora_mid)",
}


def keymap_for(unet) -> K.KeyMap:
    """Key names for a live (or meta-device) UNet; peft wrapper modules are left out."""
    paths = [n.removesuffix(".base_layer") for n, _ in unet.named_modules() if n and "lora_" not in n]
    return K.KeyMap.for_unet(unet.config, paths)


def check_file(path: Path) -> None:
    """The checks that need no reading: commands call it early so a typo fails before any model loads."""
    path = Path(path)
    if path.is_dir():
        raise LoraFileError(f"LoRA file {path} is a folder; pass the .safetensors file inside it.")
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} not found.")
    if not os.access(path, os.R_OK):
        raise LoraFileError(f"LoRA file {path} cannot be read (permission denied).")
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise LoraFileError(f"{path} is a pickle file, which can run code: unsupported, convert it to .safetensors.")


def _load(path: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a bad header
        raise LoraFileError(f"{path} is not a readable .safetensors file ({exc}).") from exc


def detect_format(tensors: dict) -> str:
    names = list(tensors)
    found = sorted({label for k in names for marker, label in UNSUPPORTED.items() if _marks(k, marker)})
    if found:
        raise LoraFileError(f"unsupported LoRA type: {', '.join(found)}; loratool reads LoRA and LoCon only.")
    if any(k.startswith("lora_te_") for k in names):
        return "kohya-sd1"
    if any(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in names):
        return "kohya"
    if any(k.startswith(K.LYCORIS_PREFIX) for k in names):
        return "lycoris"
    layouts = {K.diffusers_layout(k) for k in names if K.parse_diffusers_key(k) and not k.endswith(".alpha")}
    for layout in ("diffusers-old", "diffusers", "peft"):
        if layout in layouts:
            return layout
    return "unknown"


def _marks(key: str, marker: str) -> bool:
    return key.endswith((marker, marker + "_b")) if marker == ".diff" else marker in key


def read_lora(path: Path, keymap: K.KeyMap) -> LoraNetwork:
    """Any supported file → LoraNetwork (tensors as stored; alpha from the file, else rank = scale 1)."""
    tensors, metadata = _load(path)
    fmt = detect_format(tensors)
    if fmt == "kohya-sd1":
        raise LoraFileError(f"{path} is a Stable Diffusion 1.x/2.x LoRA (lora_te_ keys), not an SDXL LoRA.")
    if fmt == "unknown":
        sample = ", ".join(list(tensors)[:3])
        looks = K.other_layout(tensors)
        what = (
            f"it looks like {looks}, a layout loratool does not read" if looks else "no LoRA keys loratool recognises"
        )
        raise LoraFileError(f"{path}: {what} (first keys: {sample}).")
    kohya = fmt in ("kohya", "lycoris")
    network = _read_kohya(tensors, keymap, path) if kohya else _read_diffusers(tensors, metadata, path)
    network.metadata, network.source_format = metadata, fmt
    if not len(network):
        raise LoraFileError(f"{path} holds no LoRA modules.")
    return network


def _read_kohya(tensors: dict, keymap: K.KeyMap, path: Path) -> LoraNetwork:
    groups: dict[str, dict] = defaultdict(dict)
    stray = []
    for key, value in tensors.items():
        parsed = K.parse_kohya_key(key)
        if parsed:
            groups[parsed[0]][parsed[1]] = value
        else:
            stray.append(key)
    lookup = keymap.kohya_lookup()
    unknown = [name for name in groups if keymap.resolve_kohya(name, lookup) is None]
    _fail_unknown(path, stray + unknown)
    network = LoraNetwork()
    for name, parts in groups.items():
        component, module = keymap.resolve_kohya(name, lookup)
        down, up = _pair(parts.get("lora_down.weight"), parts.get("lora_up.weight"), name, path)
        alpha = _alpha(parts["alpha"], name, path) if "alpha" in parts else float(down.shape[0])
        network.add(LoraModule(component, module, down, up, alpha))
    return network


def _read_diffusers(tensors: dict, metadata: dict[str, str], path: Path) -> LoraNetwork:
    """diffusers, diffusers-old and PEFT keys; alpha from `.alpha` tensors, else the adapter metadata, else rank."""
    groups: dict[tuple[str, str], dict] = defaultdict(dict)
    stray = []
    for key, value in tensors.items():
        parsed = K.parse_diffusers_key(key)
        if parsed:
            groups[parsed[:2]][parsed[2]] = value
        else:
            stray.append(key)
    _fail_unknown(path, stray)
    alphas = _adapter_alphas(metadata)
    network = LoraNetwork()
    for (component, module), parts in groups.items():
        down, up = _pair(parts.get("down"), parts.get("up"), module, path)
        alpha = _alpha(parts["alpha"], module, path) if "alpha" in parts else alphas(component, module, down.shape[0])
        network.add(LoraModule(component, module, down, up, float(alpha)))
    return network


def _adapter_alphas(metadata: dict[str, str]):
    """lora_alpha per component from diffusers' `lora_adapter_metadata` (peft LoraConfig, prefixed)."""
    raw = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")

    def alpha(component: str, path: str, rank: int) -> float:
        prefix = K.DIFFUSERS_PREFIX[component].rstrip(".")
        pattern = raw.get(f"{prefix}.alpha_pattern") or {}
        short = path.removeprefix("text_model.")
        for key, value in pattern.items():
            key = key.removeprefix("text_model.")
            if short == key or short.endswith("." + key):
                return float(value)
        return float(raw.get(f"{prefix}.lora_alpha", rank))  # no alpha anywhere: scale 1

    return alpha


def _pair(down, up, name: str, path: Path):
    if down is None or up is None:
        raise LoraFileError(f"{path}: module {name} has only one of its two LoRA factors.")
    if down.dim() not in (2, 4) or up.dim() != down.dim():  # Linear (2-d) or conv (4-d) factors, nothing else
        raise LoraFileError(
            f"{path}: module {name} has {down.dim()}-d down and {up.dim()}-d up factors, not 2-d or 4-d: "
            "the file is damaged; retrain or re-download it."
        )
    if down.shape[0] != up.shape[1]:
        raise LoraFileError(f"{path}: module {name} has rank {down.shape[0]} down but {up.shape[1]} up.")
    return down, up


def _alpha(tensor, name: str, path: Path) -> float:
    """A module's alpha: one number (a vector or an empty tensor is a damaged file, not an error deep in torch)."""
    if tensor.numel() != 1:
        raise LoraFileError(f"{path}: module {name} has an alpha of shape {tuple(tensor.shape)}, not one number.")
    return float(tensor.float().item())


def _fail_unknown(path: Path, names: list[str]) -> None:
    if names:
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        looks = K.other_layout(names)
        hint = f"they look like {looks}, a layout loratool does not read" if looks else "a LoRA for another base model?"
        listed = ", ".join(sorted(names)[:5])
        raise LoraFileError(f"{path}: {len(names)} keys do not name a module of this model ({listed}{more}); {hint}")


def check_fits(network: LoraNetwork, shapes: dict[tuple[str, str], tuple[int, ...]], source: str) -> None:
    """Every module exists in the model and its factors match the layer's weight shape."""
    for m in network:
        want = shapes.get(m.key)
        if want is None:
            raise LoraFileError(f"{source}: module {m.component}:{m.path} does not exist in this model.")
        got = (m.up.shape[0], *m.down.shape[1:])
        if tuple(got) != tuple(want):
            raise LoraFileError(
                f"{source}: module {m.component}:{m.path} is {'×'.join(map(str, got))} but the model's layer is "
                f"{'×'.join(map(str, want))}: this LoRA was made for another base model."
            )


def standard_metadata(network: LoraNetwork, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ss_* keys kohya-aware tools read, plus loratool's own.

    As in sd-scripts, `ss_network_dim`/`alpha` describe the Linear and 1×1 modules and `ss_network_args` the
    3×3 convs (LoCon): `conv_dim` is the 3×3 rank actually present, `conv_alpha` its alpha.
    """
    conv3 = [m for m in network if _is_conv3x3(m)]
    rest = [m for m in network if not _is_conv3x3(m)] or conv3
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _one({m.rank for m in rest}),
        "ss_network_alpha": _one({float(m.alpha) for m in rest}),
        "loratool_version": __version__,
    }
    if conv3:
        args = {"conv_dim": _one({m.rank for m in conv3}), "conv_alpha": _one({float(m.alpha) for m in conv3})}
        meta["ss_network_args"] = json.dumps(args)
    return meta | (extra or {})


def _is_conv3x3(m: LoraModule) -> bool:
    return m.is_conv and tuple(m.down.shape[2:]) != (1, 1)


def _one(values: set) -> str:
    return _num(next(iter(values))) if len(values) == 1 else "Dynamic"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def modelspec(title: str, resolution: int | str = 1024, date: str | None = None) -> dict[str, str]:
    """Stability AI's model-spec keys, as sd-scripts writes them for an SDXL LoRA (Forge reads the architecture)."""
    from datetime import datetime

    size = f"{resolution}x{resolution}" if isinstance(resolution, int) else resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": size,
        "modelspec.date": date or datetime.now().replace(microsecond=0).isoformat(),  # sd-scripts: local, no tz
    }


def sshs_hashes(tensors: dict, metadata: dict[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`), computed as sd-scripts' `precalculate_safetensors_hashes`.

    sd-scripts serialises the tensors with only the `ss_*` metadata (so user metadata cannot change the hashes)
    and applies A1111's additional-networks hashes to those bytes: the model hash is sha256 of everything after
    the header (8-byte length + JSON), i.e. of the tensor data alone, which is what A1111 computes on the real
    file too; the legacy hash is the first 8 hex digits of sha256 of the 0x10000 bytes at offset 0x100000.
    """
    import hashlib

    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header :]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


UI_SUPPORT = {
    "kohya": "every UI: ComfyUI, A1111, Forge, diffusers and sd-scripts load every module",
    "diffusers": (
        "diffusers and peft only: ComfyUI drops most UNet modules, A1111 and Forge load none; "
        "write --format kohya for UIs"
    ),
}


def works_in(fmt: str) -> str:
    """Which tools load a file of this layout, in words (inspect and merge say it)."""
    return UI_SUPPORT.get(fmt, "loratool reads it; re-write it as kohya (`loratool merge FILE -o OUT`) for every UI")


def write_lora(
    network: LoraNetwork,
    path: Path,
    *,
    keymap: K.KeyMap,
    fmt: str = "kohya",
    metadata: dict[str, str] | None = None,
    force: bool = False,
    dtype=None,
) -> None:
    """Write atomically in kohya (SGM names + .alpha) or diffusers (lora_A/B, scale 1) layout.

    diffusers files carry their strength in the factors (alpha = rank): ComfyUI ignores the adapter metadata
    that holds alphas there, and one alpha per rank also keeps diffusers clear of its alpha_pattern mangling.
    """
    from safetensors.torch import save_file

    from loratool.files import atomic_path

    if fmt not in ("kohya", "diffusers"):
        raise LoraFileError(f"--format must be kohya or diffusers, not {fmt!r}.")
    cast = (lambda t: t.to(dtype).contiguous()) if dtype is not None else (lambda t: t.contiguous())
    if fmt == "kohya":
        tensors = _kohya_tensors(network, keymap, cast)
    else:
        network = LoraNetwork({m.key: m.with_alpha(m.rank) for m in network}, network.metadata)
        tensors = _diffusers_tensors(network, cast)
    meta = standard_metadata(network) | modelspec(Path(path).stem) | (metadata or {})
    meta |= {"ss_output_name": Path(path).stem, "loratool_format": fmt}
    if fmt == "diffusers":
        meta["lora_adapter_metadata"] = _adapter_metadata(network)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(tensors, meta)
    with atomic_path(Path(path), force=force) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _kohya_tensors(network: LoraNetwork, keymap: K.KeyMap, cast) -> dict:
    import torch

    out = {}
    for m in network:
        name = keymap.kohya_name(m.component, m.path)
        out[f"{name}.lora_down.weight"] = cast(m.down)
        out[f"{name}.lora_up.weight"] = cast(m.up)
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


def _diffusers_tensors(network: LoraNetwork, cast) -> dict:
    out = {}
    for m in network:
        out[K.diffusers_key(m.component, m.path, "lora_A")] = cast(m.down)
        out[K.diffusers_key(m.component, m.path, "lora_B")] = cast(m.up)
    return out


def _adapter_metadata(network: LoraNetwork) -> str:
    """diffusers' `lora_adapter_metadata`: one peft LoraConfig per component, keys prefixed by component."""
    from loratool.lora.apply import peft_config

    packed = {}
    for component, prefix in K.DIFFUSERS_PREFIX.items():
        modules = [m for m in network if m.component == component]
        if not modules:
            continue
        config = peft_config(modules)
        fields = {
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "target_modules": sorted(config.target_modules),
            "rank_pattern": config.rank_pattern,
            "alpha_pattern": config.alpha_pattern,
        }
        packed |= {f"{prefix.rstrip('.')}.{k}": v for k, v in fields.items()}
    return json.dumps(packed, sort_keys=True)
