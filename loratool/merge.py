"""`loratool merge`: signed sums of LoRAs, re-factored exactly (or truncated, with the error reported).

slider = A·(+1) + B·(−1). Per module the exact ΔW = Σ wᵢ·(αᵢ/rᵢ)·upᵢ·downᵢ is re-factored from the
stacked factors (QR + SVD of a small core, `lora.ops`) without building the dense out×in matrix.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

from loratool.errors import InputError, LoraFileError
from loratool.fold import fold_into_base
from loratool.lora.targets import UNET_BLOCKS, in_blocks, parse_blocks
from loratool.options import check_numbers, option
from loratool.sdxl.index import LoraSpec, ModelIndex, model_index, parse_spec, read
from loratool.sdxl.models import MODEL_CONFIG_HELP

log = logging.getLogger(__name__)
DTYPES = ("fp16", "bf16", "fp32")
MODEL, SMALLER, CALIBRATION = "Model", "Smaller files (truncation)", "Strength calibration (renders)"


@dataclass
class MergeConfig:
    """Everything `loratool merge` needs; also recorded in the output's metadata."""

    inputs: list[LoraSpec]  # FILE[:WEIGHT] text or (path, weight) pairs are accepted and parsed
    output: Path = option(MISSING, "Output .safetensors (or folder with --into-base).", "-o", "--output")
    svd: bool | None = option(None, "Exact SVD re-factoring (default for 2+ inputs).", "--svd/--no-svd")
    rank: int | None = option(None, "Truncate each module to this rank.", panel=SMALLER)
    sv_fro: float | None = option(None, "Keep the Frobenius-norm fraction F.", panel=SMALLER)
    sv_ratio: float | None = option(None, "Keep singular values > S0/R.", panel=SMALLER)
    alpha: float | None = option(None, "One alpha for every module (default: the most common merged rank).")
    blocks: list[str] = option(
        list(UNET_BLOCKS),
        "UNet blocks to keep: a subset of down,mid,up (e.g. up: a slider that keeps the layout; text-encoder "
        "modules stay).",
        cli_type=str,
    )
    dtype: str = option("fp16", "fp16 | bf16 | fp32 for the output.")
    float64: bool = option(False, "Compute in float64 (default float32).")
    format: str = option("kohya", "kohya or diffusers.")
    model: str | None = option(None, "Base to check against / fold into (default: SDXL 1.0 base).", panel=MODEL)
    model_config: str | None = option(None, MODEL_CONFIG_HELP, panel=MODEL)
    into_base: bool = option(False, "Fold the LoRAs into --model, write a model.", panel=MODEL)
    calibrate: tuple[Path, Path] | None = option(
        None, "Rescale so ±1 renders change half as much as pair A B differ.", "--calibrate", panel=CALIBRATION
    )
    target_change: float | None = option(
        None, "Rescale so ±1 renders change this mean |Δpixel| (0..1), e.g. 0.1.", panel=CALIBRATION
    )
    calibration_prompt: str = option("", "Prompt of the calibration renders (default: empty).", panel=CALIBRATION)
    report: Path | None = option(None, "Write the per-module table as JSON.")
    force: bool = option(False, "Overwrite existing outputs.")
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.report = Path(self.report) if self.report is not None else None
        self.inputs = [parse_spec(spec) for spec in self.inputs]  # a bad weight fails before any file is read
        self.blocks = parse_blocks(self.blocks)
        check_numbers(self)
        if self.alpha is not None and self.alpha <= 0:
            raise InputError(f"--alpha must be positive, not {self.alpha}.")
        if not self.inputs:
            raise InputError("merge needs at least one LoRA file.")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}.")
        if self.rank is not None and self.rank < 1:
            raise InputError(f"--rank must be at least 1, not {self.rank}.")
        if self.sv_fro is not None and not 0 < self.sv_fro <= 1:
            raise InputError(f"--sv-fro must be in (0, 1], not {self.sv_fro}.")
        if self.sv_ratio is not None and self.sv_ratio <= 1:
            raise InputError(f"--sv-ratio must be greater than 1, not {self.sv_ratio}.")
        truncating = self.rank is not None or self.sv_fro is not None or self.sv_ratio is not None
        if self.svd is False and truncating:
            raise InputError("--rank/--sv-fro/--sv-ratio need --svd; --no-svd concatenates exactly.")
        if self.svd is None:
            self.svd = len(self.inputs) > 1 or truncating
        if self.into_base and not self.model:
            raise InputError("--into-base needs --model: the base model to fold the LoRAs into.")
        if self.calibrate is not None:
            self.calibrate = tuple(Path(p) for p in self.calibrate)
            if len(self.calibrate) != 2:
                raise InputError("--calibrate takes the pair's two images: --calibrate A.png B.png.")
            for image in self.calibrate:
                if not image.is_file():
                    raise InputError(f"--calibrate {image}: no such image file.")
        if self.target_change is not None and not 0 < self.target_change < 1:
            raise InputError(f"--target-change is a mean pixel change in (0, 1), not {self.target_change}.")
        if self.calibrate and self.target_change is not None:
            raise InputError("--calibrate A B sets the target from the pair; drop it or --target-change.")
        if self.into_base and self.blocks != list(UNET_BLOCKS):
            raise InputError("--blocks picks the modules of a LoRA file; drop it with --into-base.")
        if self.calibrating and self.into_base:
            raise InputError("--calibrate/--target-change rescale a slider file; drop --into-base.")

    @property
    def calibrating(self) -> bool:
        return self.calibrate is not None or self.target_change is not None


def _gather(config: MergeConfig, index: ModelIndex):
    """Read and check every input; → {module key: [(weight, LoraModule, file)]} of the modules --blocks keeps,
    and input hashes."""
    terms: dict[tuple[str, str], list] = {}
    hashes = {}
    for spec in config.inputs:
        lora = read(spec, index)
        for m in lora.network:
            terms.setdefault(m.key, []).append((lora.weight, m, lora.path))
        hashes[str(lora.path)] = lora.sha256
    outside = [k for k in terms if k[0] == "unet" and not in_blocks(k[1], config.blocks)]
    if len(outside) == len(terms):
        raise LoraFileError(f"--blocks {','.join(config.blocks)}: none of the inputs' modules lie in those blocks.")
    if outside:
        log.info("--blocks %s: left out %d UNet modules of other blocks", ",".join(config.blocks), len(outside))
    return {k: v for k, v in terms.items() if k not in outside}, hashes


def merge_module(key, group, config: MergeConfig):
    """One module's merged LoraModule (or None when ΔW is zero) and its report row."""
    import torch

    from loratool.lora import ops
    from loratool.lora.network import LoraModule

    compute = torch.float64 if config.float64 else torch.float32
    factors = [(w, m.up, m.down, float(m.alpha)) for w, m, _ in group]
    row = {"module": f"{key[0]}:{key[1]}", "inputs": len(group), "rank_in": sum(m.rank for _, m, _ in group)}
    if not config.svd:
        up, down, alpha = ops.concat_exact(factors)
        return LoraModule(key[0], key[1], down, up, alpha), row | {"rank": int(down.shape[0])}
    merged = ops.merge_exact(factors, rank=config.rank, sv_fro=config.sv_fro, sv_ratio=config.sv_ratio, dtype=compute)
    row |= {"rank": merged.rank, "retained_energy": merged.retained_energy, "truncation_error": merged.rel_error}
    if merged.is_zero:
        return None, row | {"dropped": "zero"}
    return LoraModule(key[0], key[1], merged.down, merged.up, float(merged.rank)), row  # scale 1


def uniform_alpha(modules: list, alpha: float | None) -> float:
    """The one alpha a merge writes: `alpha`, else the most common rank (those modules keep scale 1).

    Per-module alphas (alpha = rank) load exactly in ComfyUI and A1111 but ~11 % off in diffusers, whose
    alpha_pattern mangles attention-layer names; with one alpha every loader reads the same ΔW.
    """
    if alpha is not None:
        return float(alpha)
    ranks = Counter(m.rank for m in modules).most_common()
    return float(max(rank for rank, n in ranks if n == ranks[0][1]))


def _cast(module, dtype, name: str) -> None:
    from loratool.lora import ops

    try:
        module.down, module.up = ops.cast_checked(module.down, dtype), ops.cast_checked(module.up, dtype)
    except OverflowError:
        raise LoraFileError(f"module {name} overflows {dtype}: write with --dtype bf16 or fp32.") from None


def merge_networks(config: MergeConfig, index: ModelIndex):
    """All inputs → one LoraNetwork, the report rows and the input hashes."""
    import torch

    from loratool.lora import ops
    from loratool.lora.network import LoraNetwork

    terms, hashes = _gather(config, index)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype]
    merged, rows = [], []
    for key in sorted(terms):
        module, row = merge_module(key, terms[key], config)
        rows.append(row)
        if module is not None:
            merged.append((module, row))
    if not merged:
        raise LoraFileError("every merged module is zero (did you merge a LoRA with itself at +1 and −1?).")
    alpha = uniform_alpha([m for m, _ in merged], config.alpha)
    network = LoraNetwork()
    for module, row in merged:
        module = module.with_alpha(alpha)
        _cast(module, dtype, row["module"])
        # Measured on what is written (after the dtype cast), against the exact weighted sum.
        exact = [(w, m.up, m.down, float(m.alpha)) for w, m, _ in terms[module.key]]
        row["rel_error"] = ops.factored_rel_error(exact, module.up, module.down, module.scale)
        network.add(module)
    return network, rows, hashes


def summarize(rows: list[dict]) -> str:
    kept = [r for r in rows if "dropped" not in r]
    dropped = len(rows) - len(kept)
    ranks = sorted({r["rank"] for r in kept})
    worst = max((r["rel_error"] for r in kept), default=0.0)
    energy = min((r.get("retained_energy", 1.0) for r in kept), default=1.0)
    text = f"merged {len(kept)} modules, rank {ranks[0]}" + (f"–{ranks[-1]}" if len(ranks) > 1 else "")
    text += f", max relative error {worst:.2e}, min retained energy {energy:.6f}"
    return text + (f"; dropped {dropped} zero modules" if dropped else "")


def _recipe(config: MergeConfig, hashes: dict[str, str]) -> dict[str, str]:
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    record["inputs"] = [[str(p), w] for p, w in config.inputs]
    record["calibrate"] = [str(p) for p in config.calibrate] if config.calibrate else None
    meta = {"loratool_recipe": json.dumps({"verb": "merge", **record}), "loratool_inputs_sha256": json.dumps(hashes)}
    if config.model:  # what `sample`/`merge`/`inspect` read back as their default --model
        meta["loratool_base_model"] = config.model
    return meta


def run(config: MergeConfig) -> Path:
    from loratool.files import check_writable, output_lock

    check_writable(config.output, config.force, file=not config.into_base)
    if config.report:  # now, not after the merge is written
        check_writable(config.report, True, file=True)
    with output_lock(config.output):  # a second merge to the same output refuses instead of racing this one
        return fold_into_base(config) if config.into_base else _merge(config)


def _merge(config: MergeConfig) -> Path:
    from loratool.files import atomic_path
    from loratool.lora.io import works_in, write_lora

    index = model_index(config.model)
    network, rows, hashes = merge_networks(config, index)
    meta = index.base_metadata(config.model) | _recipe(config, hashes)
    if config.calibrating:
        from loratool.calibrate import calibrate

        images = list(config.calibrate or [])
        network, note = calibrate(network, config.model, images, config.target_change, config.calibration_prompt)
        meta |= note
    write_lora(network, config.output, keymap=index.keymap, fmt=config.format, metadata=meta, force=config.force)
    log.info("%s", summarize(rows))
    log.info("%s format: loads in %s", config.format, works_in(config.format))
    if config.report:
        with atomic_path(Path(config.report), force=True) as tmp:
            tmp.write_text(json.dumps({"summary": summarize(rows), "modules": rows}, indent=1))
    return config.output
