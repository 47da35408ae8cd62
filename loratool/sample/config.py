"""What `loratool sample` is asked to do: SampleConfig (the Python API, recorded in every output) and the
parsers for its flags. Validation happens here, so a bad flag fails before any model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from loratool.errors import InputError
from loratool.options import check_numbers, option
from loratool.sample.pipeline import check_scheduler
from loratool.sdxl.index import parse_spec
from loratool.sdxl.models import DEFAULT_BASE, DEFAULT_REFINER, DEVICE_HELP, MODEL_CONFIG_HELP, MODEL_HELP, check_device

MODEL, SWEEP, REFINER, REFERENCE = "Model", "Slider sweep", "Refiner hand-off", "Reference-only"

REFERENCE_MODES = ("attn", "adain", "attn+adain")


@dataclass
class SampleConfig:
    """Everything `loratool sample` needs; also what each PNG and sweep.json record."""

    output: Path = option(Path("samples"), "Output folder.", "-o", "--output")
    prompt: str = option("", "Prompt for both text encoders.")
    prompt_2: str | None = option(None, "Prompt for text encoder 2 only.")
    negative_prompt: str = option("", "Negative prompt.")
    negative_prompt_2: str | None = option(None, "Negative prompt for text encoder 2 only.")
    seeds: list[int] = option([0], "Comma-separated seeds (rows of the sheet).", "--seed", "--seeds", cli_type=str)
    steps: int = option(30, "Sampling steps.")
    guidance: float = option(5.0, "Classifier-free guidance scale.")
    guidance_rescale: float = option(
        0.0,
        "CFG rescale φ in [0, 1] (Lin et al. 2023): against the over-exposed renders that guidance gives "
        "v-prediction and zero-terminal-SNR models; 0.7 is usual there, 0 is off.",
    )
    width: int | None = option(None, "Default: the model's native size.")
    height: int | None = option(None, "Default: the model's native size.")
    original_size: tuple[int, int] | None = option(None, "Micro-conditioning WxH.", cli_type=str)
    crop: tuple[int, int] = option((0, 0), "Micro-conditioning crop X,Y (left,top).", cli_type=str)
    target_size: tuple[int, int] | None = option(None, "Micro-conditioning WxH.", cli_type=str)
    scheduler: str | None = option(None, "euler | euler-a | dpm++2m | ddim.")
    high_noise_frac: float | None = option(None, "Base's share of the schedule (default 0.8).", panel=REFINER)
    refiner_frac: float | None = option(None, "Refiner runs only the last F of the schedule.", panel=REFINER)
    loras: list[str] = option([], "LoRA FILE[:WEIGHT] (repeatable).", "--lora", panel=SWEEP)
    sweep: str | None = option(None, "The --lora FILE to sweep (with several).", panel=SWEEP)
    scales: list[float] = field(default_factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0])  # --slider/--points/--values
    lora_start: float = option(0.0, "Swept LoRA off for this fraction of the base steps.", panel=SWEEP)
    model: str = option(DEFAULT_BASE, MODEL_HELP, panel=MODEL)
    model_config: str | None = option(None, MODEL_CONFIG_HELP, panel=MODEL)
    refiner: str | None = option(
        DEFAULT_REFINER, "Refiner hub id, folder, file or demo; 'none' disables it.", panel=MODEL
    )
    refiner_config: str | None = option(
        None, "Local diffusers folder whose configs describe a single-file --refiner.", panel=MODEL
    )
    vae: str | None = option(
        None, "VAE override; on CUDA fp16 the fp16-fix VAE is the default ('base': the model's).", panel=MODEL
    )
    precision: str = option("auto", "auto | fp16 | bf16 | fp32 (auto: fp16 on GPU, fp32 on CPU).", panel=MODEL)
    device: str | None = option(None, DEVICE_HELP, panel=MODEL)
    cpu_offload: bool = option(False, "Model CPU offload (CUDA only).", panel=MODEL)
    compile: bool = option(False, "torch.compile the UNet (CUDA only).", panel=MODEL)
    switch: str = "fold"  # fold | fuse | adapters: how LoRA weights change (see benchmarks/sample.py)
    force: bool = option(False, "Overwrite existing outputs.")
    reference: Path | None = option(None, "Pull the render toward this image (reference-only).", panel=REFERENCE)
    reference_mode: str | None = option(None, "attn | adain | attn+adain (default attn).", panel=REFERENCE)
    reference_variant: str | None = option(None, "coarse | fine (default fine).", panel=REFERENCE)
    style_fidelity: float | None = option(None, "Fine only: 0 (= coarse) .. 1 (default 0.5).", panel=REFERENCE)
    reference_weight: float | None = option(
        None, "Share of UNet layers that see it, widest first, 0..1 (default 1).", panel=REFERENCE
    )
    reference_refiner: bool = option(False, "Guide the refiner too.", panel=REFERENCE)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if isinstance(self.seeds, str):
            self.seeds = parse_seeds(self.seeds)
        self.original_size = parse_pair(self.original_size, "--original-size", "x")
        self.crop = parse_pair(self.crop, "--crop", ",")
        self.target_size = parse_pair(self.target_size, "--target-size", "x")
        check_numbers(self)
        check_device(self.device)
        if any(s < 0 for s in self.seeds):
            raise InputError(f"--seeds must be 0 or more, not {self.seeds}.")
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, not {self.steps}.")
        self._resolve_split()
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 64 or value % 8):
                raise InputError(f"--{name} must be a multiple of 8 and at least 64, not {value}.")
        if not 0.0 <= self.lora_start <= 1.0:
            raise InputError(f"--lora-start must be in [0, 1], not {self.lora_start}.")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise InputError(f"--guidance-rescale must be in [0, 1], not {self.guidance_rescale}.")
        if not self.seeds:
            raise InputError("--seeds needs at least one seed.")
        if len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"--seeds lists a seed twice: {self.seeds}.")
        if self.loras and not self.scales:
            raise InputError("--values/--slider gave no scales.")
        check_scheduler(self.scheduler)
        self._resolve_reference()
        self.swept_index()  # a bad --sweep fails now, not after loading models

    def _resolve_split(self) -> None:
        if self.refiner_frac is not None:
            # a recorded config holds both, consistent: it must reproduce
            if self.high_noise_frac is not None and self.high_noise_frac != round(1.0 - self.refiner_frac, 10):
                raise InputError("give --high-noise-frac or --refiner-frac, not both (F = 1 - high-noise-frac).")
            if not 0.0 <= self.refiner_frac < 1.0:
                raise InputError(f"--refiner-frac must be in [0, 1), not {self.refiner_frac}.")
            self.high_noise_frac = round(1.0 - self.refiner_frac, 10)
        if self.high_noise_frac is None:
            self.high_noise_frac = 0.8
        if not 0.0 < self.high_noise_frac <= 1.0:
            raise InputError(f"--high-noise-frac must be in (0, 1], not {self.high_noise_frac}.")

    def _resolve_reference(self) -> None:
        """Defaults for a --reference, and errors for reference options without one."""
        given = {
            "--reference-mode": self.reference_mode,
            "--reference-variant": self.reference_variant,
            "--style-fidelity": self.style_fidelity,
            "--reference-weight": self.reference_weight,
            "--reference-refiner": self.reference_refiner or None,
        }
        if self.reference is None:
            flag = next((f for f, v in given.items() if v is not None), None)
            if flag:
                raise InputError(f"{flag} needs --reference IMAGE.")
            return
        if self.compile:
            raise InputError("--compile does not combine with --reference: leave one of them out.")
        self.reference_mode = self.reference_mode or "attn"
        self.reference_variant = self.reference_variant or "fine"
        if self.reference_mode not in REFERENCE_MODES:
            raise InputError(
                f"--reference-mode must be one of {', '.join(REFERENCE_MODES)}, not {self.reference_mode!r}."
            )
        if self.reference_variant not in ("coarse", "fine"):
            raise InputError(f"--reference-variant must be coarse or fine, not {self.reference_variant!r}.")
        if self.reference_variant == "coarse" and self.style_fidelity is not None:
            raise InputError("--style-fidelity applies to --reference-variant fine only (coarse is fidelity 0).")
        if self.reference_variant == "fine" and self.style_fidelity is None:
            self.style_fidelity = 0.5
        if self.style_fidelity is not None and not 0.0 <= self.style_fidelity <= 1.0:
            raise InputError(f"--style-fidelity must be in [0, 1], not {self.style_fidelity}.")
        self.reference_weight = 1.0 if self.reference_weight is None else self.reference_weight
        if not 0.0 <= self.reference_weight <= 1.0:
            raise InputError(f"--reference-weight must be in [0, 1], not {self.reference_weight}.")

    @property
    def uses_refiner(self) -> bool:
        return self.refiner not in (None, "none") and self.high_noise_frac < 1.0

    def swept_index(self) -> int | None:
        """Position of the swept LoRA in `loras`: the only one, or the one --sweep names (path or file stem)."""
        if not self.loras:
            if self.sweep:
                raise InputError("--sweep names a LoRA to sweep, but no --lora was given.")
            return None
        paths = [parse_spec(s).path for s in self.loras]
        if self.sweep is None:
            if len(paths) > 1:
                raise InputError("several --lora files: pick the swept one with --sweep FILE.")
            return 0
        hits = [i for i, p in enumerate(paths) if self.sweep in (str(p), p.name, p.stem)]
        if len(hits) != 1:
            raise InputError(f"--sweep {self.sweep} must name exactly one of the --lora files.")
        return hits[0]

    def record(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:  # 1e23 included: a seed is an integer
        raise InputError(f"--seeds takes comma-separated integers, not {text!r}.") from None


def parse_pair(text: str | list | tuple | None, flag: str, sep: str) -> tuple[int, int] | None:
    """`1024x768` (sep "x") or `0,32` (sep ",") → (1024, 768); errors name the flag. A pair stays a pair
    (the Python API, a TOML file, a recorded config)."""
    if text is None:
        return None
    if isinstance(text, list | tuple):
        text = sep.join(map(str, text))
    try:
        a, b = (int(v) for v in text.lower().split(sep))
    except ValueError:
        raise InputError(f"{flag} takes two integers as A{sep}B, not {text!r}.") from None
    if a < 0 or b < 0:
        raise InputError(f"{flag} takes non-negative integers, not {text!r}.")
    return a, b
