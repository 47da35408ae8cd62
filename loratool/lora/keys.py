"""ALL key-name translation between diffusers module paths and the names other tools use.

Nothing else in loratool rewrites state-dict keys. The UNet's diffusers ↔ SGM/LDM ("original")
mapping is derived from the UNet config (blocks, layers per block), so it holds for real SDXL and for
the tiny test models alike. Text encoders use the HF CLIP module paths under both naming schemes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

KOHYA_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
DIFFUSERS_PREFIX = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
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
        """Flattened kohya name → (component, diffusers path), for SGM and diffusers-style UNet names."""
        table: dict[str, tuple[str, str]] = {}
        for path in self.unet_modules:
            table[KOHYA_PREFIX["unet"] + flat(path)] = ("unet", path)
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


def diffusers_key(component: str, path: str, which: str) -> str:
    """`unet.<path>.lora_A.weight` (down) or `.lora_B.weight` (up), as diffusers' load_lora_weights reads."""
    return f"{DIFFUSERS_PREFIX[component]}{path}.{which}.weight"


def parse_diffusers_key(key: str) -> tuple[str, str, str] | None:
    """(component, path, 'lora_A'|'lora_B') for a diffusers/PEFT key, else None."""
    for component, prefix in DIFFUSERS_PREFIX.items():
        if key.startswith(prefix) and (
            m := re.match(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key[len(prefix) :])
        ):
            return component, m.group(1), m.group(2)
    return None
