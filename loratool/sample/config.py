"""What `loratool sample` is asked to do: SampleConfig (the Python API, recorded in every output) and the
parsers for its flags. Validation happens here, so a bad flag fails before any model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from loratool.errors import InputError
from loratool.sample.pipeline import check_scheduler
from loratool.sdxl.index import parse_spec
from loratool.sdxl.models import DEFAULT_BASE, DEFAULT_REFINER

REFERENCE_MODES = ("attn", "adain", "attn+adain")


@dataclass
class SampleConfig:
    """Everything `loratool sample` needs; also what each PNG and sweep.json record."""

    output: Path = Path("samples")
    prompt: str = ""
    prompt_2: str | None = None
    negative_prompt: str = ""
    negative_prompt_2: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 30
    guidance: float = 5.0
    width: int | None = None
    height: int | None = None
    original_size: tuple[int, int] | None = None  # (width, height)
    crop: tuple[int, int] = (0, 0)  # (x, y) = (left, top)
    target_size: tuple[int, int] | None = None  # (width, height)
    scheduler: str | None = None
    high_noise_frac: float | None = None  # default 0.8
    refiner_frac: float | None = None  # the refiner's share: 1 - high_noise_frac
    loras: list[str] = field(default_factory=list)  # FILE[:WEIGHT]
    sweep: str | None = None  # which LoRA is swept (needed with several)
    scales: list[float] = field(default_factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0])
    lora_start: float = 0.0  # swept LoRA off for this fraction of the base steps
    model: str = DEFAULT_BASE
    model_config: str | None = None
    refiner: str | None = DEFAULT_REFINER
    refiner_config: str | None = None
    vae: str | None = None
    precision: str = "auto"
    device: str | None = None
    cpu_offload: bool = False
    compile: bool = False
    switch: str = "fold"  # fold | fuse | adapters: how LoRA weights change (see benchmarks/sample.py)
    force: bool = False
    reference: Path | None = None  # image the render is pulled toward, nothing trained (sample/reference.py)
    reference_mode: str | None = None  # attn | adain | attn+adain (default attn)
    reference_variant: str | None = None  # coarse | fine (default fine): fine spares the unconditional half
    style_fidelity: float | None = None  # fine only, 0..1 (default 0.5): 0 is coarse, 1 the most faithful
    reference_weight: float | None = None  # share of the UNet's layers that see it, widest first (default 1)
    reference_refiner: bool = False  # guide the refiner too

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, not {self.steps}.")
        self._resolve_split()
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 64 or value % 8):
                raise InputError(f"--{name} must be a multiple of 8 and at least 64, not {value}.")
        if not 0.0 <= self.lora_start <= 1.0:
            raise InputError(f"--lora-start must be in [0, 1], not {self.lora_start}.")
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
            if self.high_noise_frac is not None:
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
    except ValueError:
        raise InputError(f"--seeds takes comma-separated integers, not {text!r}.") from None


def parse_pair(text: str | None, flag: str, sep: str) -> tuple[int, int] | None:
    """`1024x768` (sep "x") or `0,32` (sep ",") → (1024, 768); errors name the flag."""
    if text is None:
        return None
    try:
        a, b = (int(v) for v in text.lower().split(sep))
    except ValueError:
        raise InputError(f"{flag} takes two integers as A{sep}B, not {text!r}.") from None
    if a < 0 or b < 0:
        raise InputError(f"{flag} takes non-negative integers, not {text!r}.")
    return a, b
