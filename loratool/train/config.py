"""TrainConfig: the Python API of `loratool train`, and what the outputs record about how they were made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from loratool.errors import InputError
from loratool.lora.io import check_file
from loratool.sdxl.index import LoraSpec, parse_spec
from loratool.sdxl.models import DEFAULT_BASE

OPTIMIZERS = ("adamw", "adamw8bit")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
QUANTIZATIONS = ("nf4", "int8")


@dataclass
class TrainConfig:
    """Copy-machine training: overfit a UNet LoRA on one image (or each image of a --pair) with an empty prompt."""

    images: list[Path]
    output: Path = Path("lora.safetensors")
    pair: bool = False  # two images → <prefix>_a / <prefix>_b, trained with identical settings
    model: str = DEFAULT_BASE
    model_config: str | None = None
    rank: int = 8
    alpha: float = 8.0
    steps: int = 1500
    lr: float = 1e-4
    resolution: int = 1024
    seed: int = 0
    optimizer: str = "adamw"
    mixed_precision: str = "no"
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    pure_noise: float = 0.0  # fraction of steps trained from pure noise, as the sampler starts (copy mode)
    min_snr_gamma: float | None = None
    check_every: int | None = None  # None → steps // 10; 0 turns the copy check off
    check_seeds: int = 2
    check_steps: int = 8
    stop_when_copied: float | None = None  # dB of mean PSNR
    save_every: int = 0
    resume: bool = False
    base_loras: list[str] = field(default_factory=list)  # FILE[:WEIGHT], folded into the UNet before training
    quantize_base: str | None = None
    device: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        self.images = [Path(p) for p in self.images]
        self.output = Path(self.output)
        self.check_inputs()
        _in_range("--rank", self.rank, 1, 128)
        _in_range("--steps", self.steps, 1, 1_000_000)
        _in_range("--gradient-accumulation", self.gradient_accumulation, 1, 1024)
        _in_range("--check-seeds", self.check_seeds, 1, 16)
        _in_range("--check-steps", self.check_steps, 1, 200)
        _in_range("--save-every", self.save_every, 0, self.steps)
        if self.resolution < 64 or self.resolution % 64:
            raise InputError(f"--resolution must be a multiple of 64 and at least 64, not {self.resolution}.")
        if not 0 < self.lr <= 1:
            raise InputError(f"--lr must be in (0, 1], not {self.lr}.")
        if self.alpha <= 0:
            raise InputError(f"--alpha must be positive, not {self.alpha}.")
        if self.noise_offset < 0 or (self.min_snr_gamma is not None and self.min_snr_gamma <= 0):
            raise InputError("--noise-offset must be ≥ 0 and --min-snr-gamma > 0.")
        if not 0 <= self.pure_noise < 1:
            raise InputError(f"--pure-noise is a fraction of the steps in [0, 1), not {self.pure_noise}.")
        _one_of("--optimizer", self.optimizer, OPTIMIZERS)
        _one_of("--mixed-precision", self.mixed_precision, MIXED_PRECISIONS)
        if self.quantize_base is not None:
            _one_of("--quantize-base", self.quantize_base, QUANTIZATIONS)
        if self.check_every is None:
            self.check_every = max(1, self.steps // 10)
        _in_range("--check-every", self.check_every, 0, self.steps)
        if self.stop_when_copied is not None and not self.check_every:
            raise InputError("--stop-when-copied needs the copy check: drop --check-every 0.")
        for spec in self.base_lora_weights():  # now, so a typo fails before any model loads
            check_file(spec.path)

    def check_inputs(self) -> None:
        wanted = 2 if self.pair else 1
        if len(self.images) != wanted:
            what = "--pair takes exactly two images" if self.pair else "copy mode trains on exactly one image"
            raise InputError(f"{what}, got {len(self.images)}; use --pair A.png B.png for a slider pair.")

    def base_lora_weights(self) -> list[LoraSpec]:
        """--base-lora FILE[:WEIGHT] → (path, weight), parsed as every verb parses a LoRA; weight default 1."""
        return [parse_spec(spec) for spec in self.base_loras]

    def lora_paths(self) -> list[Path]:
        """One output per image; with --pair, -o is a prefix: <prefix>_a.safetensors, <prefix>_b.safetensors."""
        if not self.pair:
            return [self.output]
        prefix = self.output.with_suffix("") if self.output.suffix == ".safetensors" else self.output
        return [prefix.with_name(f"{prefix.name}_{tag}.safetensors") for tag in ("a", "b")]

    def record(self) -> dict:
        """JSON-ready settings for the report and the LoRA's metadata."""

        def plain(v):
            return [plain(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v

        return {k: plain(v) for k, v in asdict(self).items()}


@dataclass
class DreamboothConfig(TrainConfig):
    """Dreambooth: a UNet (and optionally text-encoder) LoRA on a folder of captioned images, with optional
    prior preservation; mode "wrong" first generates its own folder of failure images (trigger word `wrong`).

    `images` holds the instance folder (dreambooth) or nothing (wrong). The copy check does not apply.
    """

    mode: str = "dreambooth"
    prompt: str = ""  # the instance prompt; a `.txt` beside an image overrides it
    class_prompt: str | None = None  # prior preservation on when set
    class_dir: Path | None = None  # default: <output>.class/
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    batch_size: int = 1
    cache_dir: Path | None = None  # latents and embeddings on disk, reused across runs
    train_text_encoder: bool = False
    num_images: int = 100  # wrong mode: images generated
    wrong_dir: Path | None = None  # wrong mode: default <output>.wrong/
    generate_steps: int = 25  # sampling steps for generated class / wrong images
    check_every: int | None = 0

    def check_inputs(self) -> None:
        if self.mode not in ("dreambooth", "wrong"):
            raise InputError(f"--mode must be copy, dreambooth or wrong, not {self.mode!r}.")
        if self.pair:
            raise InputError(f"--pair is a copy-mode option; drop it with --mode {self.mode}.")
        if self.check_every or self.stop_when_copied is not None:
            raise InputError(
                f"--check-every/--stop-when-copied are copy-mode options; drop them with --mode {self.mode}."
            )
        self.check_every = 0
        if self.pure_noise:
            raise InputError(f"--pure-noise is a copy-mode option; drop it with --mode {self.mode}.")
        if self.mode == "dreambooth":
            if len(self.images) != 1:
                raise InputError(f"--mode dreambooth takes one folder of instance images, got {len(self.images)}.")
            if not self.prompt.strip():
                raise InputError("--mode dreambooth needs --prompt, e.g. --prompt 'a photo of sks dog'.")
        elif self.images:
            raise InputError("--mode wrong generates its own images: drop the input paths (use --wrong-dir).")
        if self.mode == "wrong":
            self.prompt = "wrong"
            _in_range("--num-images", self.num_images, 1, 100_000)
        if self.class_prompt is not None:
            _in_range("--num-class-images", self.num_class_images, 1, 100_000)
            if self.prior_loss_weight < 0:
                raise InputError(f"--prior-loss-weight must be ≥ 0, not {self.prior_loss_weight}.")
        _in_range("--batch-size", self.batch_size, 1, 4096)
        _in_range("--generate-steps", self.generate_steps, 1, 1000)
        for name in ("class_dir", "cache_dir", "wrong_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))

    @property
    def prior(self) -> bool:
        return self.class_prompt is not None

    def class_folder(self) -> Path:
        return self.class_dir or sidecars(self.output)["class"]

    def wrong_folder(self) -> Path:
        return self.wrong_dir or sidecars(self.output)["wrong"]


def sidecars(lora_path: Path) -> dict[str, Path]:
    """The files that go next to a LoRA: report, preview, and the checkpoint folder."""
    stem = lora_path.with_suffix("") if lora_path.suffix == ".safetensors" else lora_path
    return {
        "report": stem.with_name(stem.name + ".report.json"),
        "preview": stem.with_name(stem.name + ".preview.png"),
        "checkpoints": stem.with_name(stem.name + ".ckpt"),
        "class": stem.with_name(stem.name + ".class"),
        "wrong": stem.with_name(stem.name + ".wrong"),
    }


def _in_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InputError(f"{flag} must be between {low} and {high}, not {value}.")


def _one_of(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{flag} must be one of {', '.join(choices)}, not {value!r}.")
