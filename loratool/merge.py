"""`loratool merge`: signed sums of LoRAs, re-factored exactly (or truncated, with the error reported).

slider = A·(+1) + B·(−1). Per module the exact ΔW = Σ wᵢ·(αᵢ/rᵢ)·upᵢ·downᵢ is re-factored from the
stacked factors (QR + SVD of a small core, `lora.ops`) without building the dense out×in matrix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loratool.errors import InputError, LoraFileError

log = logging.getLogger(__name__)
DTYPES = ("fp16", "bf16", "fp32")


@dataclass
class MergeConfig:
    """Everything `loratool merge` needs; also recorded in the output's metadata."""

    inputs: list[tuple[Path, float]]
    output: Path
    svd: bool | None = None  # None: SVD for several inputs or when truncating, plain scaling for one
    rank: int | None = None
    sv_fro: float | None = None
    sv_ratio: float | None = None
    alpha: float | None = None
    dtype: str = "fp16"
    float64: bool = False
    format: str = "kohya"
    model: str | None = None
    model_config: str | None = None
    into_base: bool = False
    report: Path | None = None
    force: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
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


def parse_input(text: str) -> tuple[Path, float]:
    """`FILE[:WEIGHT]`; a colon inside the path (C:\\…) is kept when no number follows the last one."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or "/" in tail or "\\" in tail:
        return Path(text), 1.0
    try:
        return Path(head), float(tail)
    except ValueError:
        if head.endswith(".safetensors") or Path(head).exists():
            raise InputError(
                f"weight {tail!r} of {head} is not a number (use FILE:WEIGHT, e.g. b.safetensors:-1)."
            ) from None
        return Path(text), 1.0


def _gather(config: MergeConfig, keymap, shapes):
    """Read and validate every input; → {module key: [(weight, LoraModule, file)]} and input hashes."""
    from loratool.files import sha256
    from loratool.lora import ops
    from loratool.lora.io import check_fits, read_lora

    terms: dict[tuple[str, str], list] = {}
    hashes = {}
    for path, weight in config.inputs:
        network = read_lora(path, keymap)
        check_fits(network, shapes, str(path))
        for m in network:
            try:
                ops.check_finite(f"{path}: module {m.component}:{m.path}", m.down, m.up)
            except ValueError as exc:
                raise LoraFileError(f"{exc}: the file is damaged; retrain or re-download it.") from None
            terms.setdefault(m.key, []).append((weight, m, path))
        hashes[str(path)] = sha256(path)
    return terms, hashes


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
    alpha = float(config.alpha) if config.alpha is not None else float(merged.rank)
    up = merged.up / (alpha / merged.rank)  # keep ΔW when the user fixes alpha (scale ≠ 1)
    return LoraModule(key[0], key[1], merged.down, up, alpha), row


def _cast(module, dtype, name: str) -> None:
    from loratool.lora import ops

    try:
        module.down, module.up = ops.cast_checked(module.down, dtype), ops.cast_checked(module.up, dtype)
    except OverflowError:
        raise LoraFileError(f"module {name} overflows {dtype}: write with --dtype bf16 or fp32.") from None


def merge_networks(config: MergeConfig, keymap, shapes):
    """All inputs → one LoraNetwork, the report rows and the input hashes."""
    import torch

    from loratool.lora import ops
    from loratool.lora.network import LoraNetwork

    terms, hashes = _gather(config, keymap, shapes)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype]
    network, rows = LoraNetwork(), []
    for key in sorted(terms):
        module, row = merge_module(key, terms[key], config)
        rows.append(row)
        if module is not None:
            _cast(module, dtype, row["module"])
            # Measured on what is written (after the dtype cast), against the exact weighted sum.
            exact = [(w, m.up, m.down, float(m.alpha)) for w, m, _ in terms[key]]
            row["rel_error"] = ops.factored_rel_error(exact, module.up, module.down, module.scale)
            network.add(module)
    if not len(network):
        raise LoraFileError("every merged module is zero (did you merge a LoRA with itself at +1 and −1?).")
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
    return {"loratool_recipe": json.dumps({"verb": "merge", **record}), "loratool_inputs_sha256": json.dumps(hashes)}


def run(config: MergeConfig) -> Path:
    from loratool.files import atomic_path, check_writable
    from loratool.inspect import model_index
    from loratool.lora.io import write_lora

    check_writable(config.output, config.force)
    if config.into_base:
        from loratool.fold import fold_into_base

        return fold_into_base(config)
    keymap, shapes = model_index(config.model)
    network, rows, hashes = merge_networks(config, keymap, shapes)
    write_lora(
        network, config.output, keymap=keymap, fmt=config.format, metadata=_recipe(config, hashes), force=config.force
    )
    log.info("%s", summarize(rows))
    if config.report:
        with atomic_path(Path(config.report), force=True) as tmp:
            tmp.write_text(json.dumps({"summary": summarize(rows), "modules": rows}, indent=1))
    return config.output
