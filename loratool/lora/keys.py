"""ALL key-name translation between diffusers module paths and the names other tools use.

Nothing else in loratool rewrites state-dict keys. The UNet's diffusers ↔ SGM/LDM ("original")
mapping is derived from the UNet config (blocks, layers per block), so it holds for real SDXL and for
the tiny test models alike. Text encoders use the HF CLIP module paths under both naming schemes.

Layouts read (producer → what its keys look like):
- kohya (sd-scripts, LyCORIS-kohya, A1111/ComfyUI exports): `lora_unet_<SGM path>` / `lora_te1_` / `lora_te2_`,
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; ai-toolkit, LECO, sliders and diffusers'
  `convert_state_dict_to_kohya` put the diffusers path after `lora_unet_`.
- lycoris (SimpleTuner's LyCORIS on a diffusers UNet): `lycoris_<diffusers path>` with kohya's suffixes
  (ComfyUI maps it to the UNet only, and so do we).
- diffusers/PEFT (diffusers >= 0.25 `save_lora_weights`): `unet.<path>.lora_A.weight`, `text_encoder.…`,
  `text_encoder_2.…`; alpha in the `lora_adapter_metadata` header (else scale 1). With transformers 5 the
  first text encoder has no `text_model.` level (`text_encoder.encoder.layers.…`).
- diffusers-old (the SDXL dreambooth script before PEFT, diffusers <= 0.24): `unet.<path>.lora.down.weight`,
  `text_encoder.<path>.lora_linear_layer.down.weight`, and the older attention processors
  (`…attn1.processor.to_q_lora.down.weight`); no alpha anywhere, so scale 1.
- peft (a bare `get_peft_model_state_dict` of the UNet): `<path>.lora_A.weight`, maybe `base_model.model.` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

KOHYA_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
LYCORIS_PREFIX = "lycoris_"
DIFFUSERS_PREFIX = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding", "add_embedding")
KOHYA_KEY = re.compile(r"^((?:lora_(?:unet|te1|te2|te)|lycoris)_.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# diffusers/PEFT factor names → our roles; the adapter name PEFT may insert (`lora_A.default.weight`) is skipped.
DIFFUSERS_KEY = re.compile(
    r"^(?P<path>.+?)\.(?:(?P<peft>lora_A|lora_B)(?:\.[^.]+)?\.weight"
    r"|(?P<old>lora|lora_linear_layer)\.(?P<old_role>down|up)\.weight|(?P<alpha>alpha))$"
)
# diffusers' attention processors (LoRAAttnProcessor): `attn1.processor.to_q_lora.down.weight` → `attn1.to_q`.
PROCESSOR_KEY = re.compile(
    r"^(?P<head>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
PROCESSOR_PATHS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
ROLES = {"lora_A": "down", "lora_B": "up", "down": "down", "up": "up"}
# Layouts loratool does not read, by a marker in their keys: named in the refusal instead of a guess.
OTHER_LAYOUTS = (
    ("lora_unet_double_blocks_", "a FLUX.1 LoRA (kohya naming)"),
    ("lora_unet_single_blocks_", "a FLUX.1 LoRA (kohya naming)"),
    ("lora_unet_joint_blocks_", "a Stable Diffusion 3 LoRA (kohya naming)"),
    ("lora_prior_unet_", "a Stable Cascade LoRA"),
    ("transformer.", "a diffusion-transformer LoRA (FLUX, SD3, PixArt…; diffusers naming)"),
    ("lora_transformer_", "a diffusion-transformer LoRA (FLUX, SD3…; kohya naming)"),
    ("model.diffusion_model.", "a full SD/SDXL checkpoint (model.diffusion_model.*), not a LoRA"),
    ("diffusion_model.", "a ComfyUI-native file (diffusion_model.* keys)"),
    ("clip_g", "an SDXL textual-inversion embedding (clip_l/clip_g), not a LoRA"),
    ("emb_params", "a textual-inversion embedding, not a LoRA"),
    ("encoder.down_blocks.", "a VAE, not a LoRA"),
    ("encoder.down.", "a VAE, not a LoRA"),
)
# Inside a ResNet block the two layouts name the layers differently (LDM's nn.Sequential indices).
RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
TOP_LEVEL = (
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
TE_MODULE = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def unet_block_table(config: Mapping) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, SGM prefix, is_resnet) for every block-level module of a UNet config."""
    downs, ups = config["down_block_types"], config["up_block_types"]
    layers = _per_block(config["layers_per_block"], len(downs))
    table: list[tuple[str, str, bool]] = []
    idx = 0
    for b, kind in enumerate(downs):
        for j in range(layers[b]):
            idx += 1
            table.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{idx}.0", True))
            if "CrossAttn" in kind:
                table.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{idx}.1", False))
        if b < len(downs) - 1:
            idx += 1
            table.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", False))
    table += [
        ("mid_block.resnets.0", "middle_block.0", True),
        ("mid_block.attentions.0", "middle_block.1", False),
        ("mid_block.resnets.1", "middle_block.2", True),
    ]
    idx = 0
    for b, kind in enumerate(ups):
        attn = "CrossAttn" in kind
        for j in range(list(reversed(layers))[b] + 1):
            table.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{idx}.0", True))
            if attn:
                table.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{idx}.1", False))
            if b < len(ups) - 1 and j == list(reversed(layers))[b]:
                slot = 2 if attn else 1
                table.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{idx}.{slot}.conv", False))
            idx += 1
    table += [(d, s, False) for d, s in TOP_LEVEL]
    return table


@dataclass(frozen=True)
class UnetPaths:
    """Translates UNet module paths between diffusers and SGM layouts for one UNet config."""

    table: tuple[tuple[str, str, bool], ...]

    @classmethod
    def from_config(cls, config: Mapping) -> UnetPaths:
        return cls(tuple(unet_block_table(config)))

    def to_sgm(self, path: str) -> str:
        for diff, sgm, is_resnet in self.table:
            if path == diff or path.startswith(diff + "."):
                rest = path[len(diff) :]
                if is_resnet:
                    rest = _rename(rest, RESNET_RENAMES)
                return sgm + rest
        raise KeyError(f"no SGM name for UNet module {path!r}")

    def to_diffusers(self, path: str) -> str:
        # Longest SGM prefix first: "input_blocks.3.0.op" must win over "input_blocks.3.0".
        for diff, sgm, is_resnet in sorted(self.table, key=lambda t: -len(t[1])):
            if path == sgm or path.startswith(sgm + "."):
                rest = path[len(sgm) :]
                if is_resnet:
                    rest = _rename(rest, tuple((b, a) for a, b in RESNET_RENAMES))
                return diff + rest
        raise KeyError(f"no diffusers name for SGM module {path!r}")


def _rename(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        if rest == "." + old or rest.startswith("." + old + "."):
            return "." + new + rest[len(old) + 1 :]
    return rest


def flat(path: str) -> str:
    return path.replace(".", "_")


@dataclass(frozen=True)
class KeyMap:
    """Names of LoRA modules in kohya (SGM), kohya-with-diffusers-paths and diffusers/PEFT files."""

    unet: UnetPaths
    unet_modules: frozenset[str]

    @classmethod
    def for_unet(cls, config: Mapping, module_paths: Iterable[str]) -> KeyMap:
        return cls(UnetPaths.from_config(config), frozenset(module_paths))

    def kohya_name(self, component: str, path: str) -> str:
        """The kohya module name written to files: SGM paths for the UNet, as sd-scripts does."""
        sgm = self.unet.to_sgm(path) if component == "unet" else path
        return KOHYA_PREFIX[component] + flat(sgm)

    def kohya_lookup(self) -> dict[str, tuple[str, str]]:
        """Flattened kohya name → (component, diffusers path), for SGM, diffusers-style and `lycoris_` UNet names."""
        table: dict[str, tuple[str, str]] = {}
        for path in self.unet_modules:
            table[KOHYA_PREFIX["unet"] + flat(path)] = ("unet", path)
            table[LYCORIS_PREFIX + flat(path)] = ("unet", path)
            try:
                table[self.kohya_name("unet", path)] = ("unet", path)
            except KeyError:
                pass  # modules with no SGM counterpart (none in SDXL) keep the diffusers-style name only
        return table

    def resolve_kohya(self, name: str, lookup: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
        if name in lookup:
            return lookup[name]
        for component in ("te1", "te2"):
            prefix = KOHYA_PREFIX[component]
            if name.startswith(prefix) and (m := TE_MODULE.match(name[len(prefix) :])):
                layer, block, leaf = m.groups()
                return component, f"text_model.encoder.layers.{layer}.{block}.{leaf}"
        return None


def parse_kohya_key(key: str) -> tuple[str, str] | None:
    """(module name, 'lora_down.weight'|'lora_up.weight'|'alpha') for a kohya or `lycoris_` key, else None."""
    m = KOHYA_KEY.match(key)
    return (m.group(1), m.group(2)) if m else None


def diffusers_key(component: str, path: str, which: str) -> str:
    """`unet.<path>.lora_A.weight` (down) or `.lora_B.weight` (up), as diffusers' load_lora_weights reads."""
    return f"{DIFFUSERS_PREFIX[component]}{path}.{which}.weight"


def split_component(key: str) -> tuple[str, str] | None:
    """(component, key inside it): `unet.`/`text_encoder.`/`text_encoder_2.` prefixes, or a bare PEFT UNet key."""
    for component, prefix in DIFFUSERS_PREFIX.items():
        if key.startswith(prefix):
            return component, key[len(prefix) :]
    bare = key.removeprefix("base_model.model.")
    return ("unet", bare) if bare.startswith(UNET_ROOTS) else None


def parse_diffusers_key(key: str) -> tuple[str, str, str] | None:
    """(component, canonical path, 'down'|'up'|'alpha') for any diffusers, PEFT or old diffusers key, else None.

    Text-encoder paths are canonical `text_model.…` whether or not the producer's transformers had that level.
    """
    split = split_component(key)
    if split is None:
        return None
    component, rest = split
    if m := PROCESSOR_KEY.match(rest):
        path = f"{m['head']}.{PROCESSOR_PATHS['unet' if component == 'unet' else 'text'][m['proj']]}"
        role = m["role"]
    elif m := DIFFUSERS_KEY.match(rest):
        path, role = m["path"], "alpha" if m["alpha"] else ROLES[m["peft"] or m["old_role"]]
    else:
        return None
    if component != "unet" and not path.startswith("text_model."):
        path = "text_model." + path
    return component, path, role


def diffusers_layout(key: str) -> str:
    """Which diffusers-family layout a key parse_diffusers_key accepts belongs to (for reports)."""
    if split_component(key)[0] == "unet" and not key.startswith("unet."):
        return "peft"
    if PROCESSOR_KEY.match(key) or re.search(r"\.(lora|lora_linear_layer)\.(down|up)\.weight$", key):
        return "diffusers-old"
    return "diffusers"


def other_layout(keys: Iterable[str]) -> str | None:
    """What a file we do not read looks like, from its key names; None if nothing familiar."""
    for marker, label in OTHER_LAYOUTS:
        if any(k.startswith(marker) for k in keys):
            return label
    return None
