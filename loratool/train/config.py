"""TrainConfig: the Python API of `loratool train`, and what the outputs record about how they were made."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from loratool.errors import InputError
from loratool.lora.io import check_file
from loratool.lora.targets import UNET_BLOCKS, parse_blocks
from loratool.options import check_numbers, option
from loratool.sdxl.index import LoraSpec, parse_spec
from loratool.sdxl.models import DEFAULT_BASE, DEVICE_HELP, MODEL_CONFIG_HELP, MODEL_HELP, check_device

OPTIMIZERS = ("adamw", "adamw8bit")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
QUANTIZATIONS = ("nf4", "int8")
MODES = ("copy", "slider", "dreambooth", "wrong")
VARIED = ("hue",)  # what --vary can vary in both images of a pair alike
VARY_TURNS = tuple(range(0, 360, 45))  # degrees round the colour wheel; 0 is the image itself
COPY, BOOTH = ("copy", "slider"), ("dreambooth", "wrong")  # slider mode is copy mode on a pair: same options
TEXT = ("slider",)  # a text slider (--positive/--negative) is slider mode without images
# 22 dB mean PSNR: an RMS error of 8 % of the range. Measured on the demo, copies whose colour follows the seed
# sit at 13–16 dB and right copies at 22–28 dB; the VAE alone reaches about 30 (report: vae_psnr).
COPY_TARGET_DB = 22.0
MIN_MARGIN_DB = 4.0  # and no seed below target − 4 dB: one seed in the wrong colour is not a copy
# Copy-mode defaults, measured on held-out demo scenes (benchmarks/copies.py, datasets/README.md): without pure
# noise and offset noise a third to a half of the renders take their colour from the seed; at lr 1e-4 a copy is
# not done in 600 steps. The other modes keep the usual 1e-4 and no offset.
COPY_LR, COPY_NOISE_OFFSET, COPY_PURE_NOISE = 1e-3, 0.2, 0.25
# For a copy of one image, two more (benchmarks/copies.py on 4 held-out sets, seeds 0-7 and the unseen 100-107;
# datasets/README.md, "Multi-resolution noise for copies" and "LoCon for copies"): multi-resolution noise 0.5
# lifted the worst unseen render on all 4 sets, and LoRAs on the 3x3 convs (rank 4) on top of it brought every
# set to a mean of 27 dB or more and its worst render to 18.7 dB or more. The two halves of a slider (--pair,
# slider mode) train without both: sliders made from such copies placed less well on 3 pairs of 3 with the
# noise, and kept less of the scene with the convs (the demo's place slider: 0.88 of renders → 0.31).
COPY_MULTIRES_NOISE, COPY_CONV_RANK = 0.5, 4


def parse_vary(text: str | list[str]) -> list[str]:
    """`--vary hue`: what a slider's halves vary alike, checked."""
    given = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    wrong = [v for v in given if v not in VARIED]
    if wrong:
        raise InputError(f"--vary takes {', '.join(VARIED)}, not {', '.join(wrong)}.")
    return given


@dataclass
class TrainConfig:
    """Copy-machine training: overfit a UNet LoRA on one image (or each image of a --pair) with an empty prompt."""

    images: list[Path]  # the arguments (or the two images of --pair)
    output: Path = option(
        Path("lora.safetensors"), "Output .safetensors (--pair: a prefix for _a/_b).", "-o", "--output"
    )
    pair: bool = False  # two images → <prefix>_a / <prefix>_b, trained with identical settings
    model: str = option(DEFAULT_BASE, MODEL_HELP, panel="Model")
    model_config: str | None = option(None, MODEL_CONFIG_HELP, panel="Model")
    rank: int = option(8, "LoRA rank (1..128).")
    alpha: float = option(8.0, "LoRA alpha; scale = alpha / rank.")
    conv_rank: int | None = option(
        None,
        "LoCon: LoRAs of this rank on the ResNet 3×3 convs too (kohya conv_dim); 0: off (default: "
        f"{COPY_CONV_RANK} for a copy of one image, else 0).",
    )
    conv_alpha: float | None = option(None, "Alpha of the 3×3 conv LoRAs (default: --conv-rank).")
    vary: list[str] = option(
        [],
        "What a slider's halves (--pair) must leave alone, varied alike in every image (the same turns), so the "
        f"pair does not teach it: hue ({len(VARY_TURNS)} turns of the colour wheel; for a size slider, with "
        "--blocks mid,up).",
        cli_type=str,
    )
    blocks: list[str] = option(
        list(UNET_BLOCKS),
        "UNet blocks that get LoRAs: a subset of down,mid,up (e.g. mid,up for the halves of a slider that "
        "should leave the layout alone; measured in datasets/README.md).",
        cli_type=str,
    )
    steps: int = option(1500, "Optimizer steps; in copy and slider mode a budget (they stop once copied).")
    lr: float | None = option(None, "Learning rate (default: 1e-3 in copy and slider mode, 1e-4 in the others).")
    resolution: int | None = option(
        None, "Bucket area ≈ resolution² (multiple of 64); default: the model's native size, as `sample` renders."
    )
    seed: int = option(0, "Seed of noise, timesteps and LoRA initialisation.")
    optimizer: str = option("adamw", "adamw | adamw8bit (CUDA).")
    mixed_precision: str = option("no", "no | fp16 | bf16")
    gradient_accumulation: int = option(1, "Steps whose gradients are summed before one update.")
    gradient_checkpointing: bool = option(False, "Less memory, slower steps.")
    noise_offset: float | None = option(
        None, "Noise offset: random per-channel shifts of the noise (default: 0.2 in copy and slider mode, else 0)."
    )
    multires_noise: float | None = option(
        None,
        "Multi-resolution noise weight in [0, 1) (kohya's multires discount): coarse noise too, so a copy learns "
        f"to ignore a seed's coarse layout (default: {COPY_MULTIRES_NOISE:g} for a copy of one image; 0 with --pair, "
        "in slider mode and the other modes).",
    )
    min_snr_gamma: float | None = option(None, "Min-SNR loss weighting, e.g. 5.")
    save_every: int = option(0, "Checkpoint every N steps into <name>.ckpt/.")
    resume: bool = option(False, "Continue from the latest checkpoint.")
    base_loras: list[str] = option([], "FILE[:WEIGHT] folded into the base first (repeatable).", "--base-lora")
    quantize_base: str | None = option(None, "nf4 | int8 (CUDA).", panel="Model")
    device: str | None = option(None, DEVICE_HELP, panel="Model")
    force: bool = option(False, "Overwrite existing outputs.")
    # copy mode: how far the copy has come
    pure_noise: float = option(
        COPY_PURE_NOISE, "Share of steps trained from pure noise, as sampling starts (0: off).", modes=COPY
    )
    check_every: int | None = option(None, "Copy check every N steps (default steps/10; 0: off).", modes=COPY)
    check_seeds: int = option(4, "Seeds rendered per copy check (fixed: 0, 1, …).", modes=COPY)
    check_steps: int = option(8, "Sampling steps per copy-check render.", modes=COPY)
    copy_target: float = option(
        COPY_TARGET_DB, f"Copied: mean PSNR ≥ this (dB) and every seed ≥ this − {MIN_MARGIN_DB:g}.", modes=COPY
    )
    # A number here is the target, as configs written before --copy-target said it; None (older records): off.
    stop_when_copied: bool | float | None = option(
        True,
        "Stop once two copy checks in a row reach --copy-target (--steps is the budget).",
        "--stop-when-copied/--no-stop-when-copied",
        modes=COPY,
        cli_type=bool,
    )

    def __post_init__(self) -> None:
        self.images = [Path(p) for p in self.images]
        self.apply_mode_defaults()
        self.output = Path(self.output)
        check_numbers(self)
        check_device(self.device)
        self.check_inputs()
        self.blocks = parse_blocks(self.blocks)
        self.check_vary()
        _in_range("--rank", self.rank, 1, 128)
        _in_range("--conv-rank", self.conv_rank, 0, 128)
        if self.conv_alpha is not None and (self.conv_alpha <= 0 or not self.conv_rank):
            raise InputError(f"--conv-alpha needs --conv-rank and must be positive, not {self.conv_alpha}.")
        _in_range("--steps", self.steps, 1, 1_000_000)
        _in_range("--gradient-accumulation", self.gradient_accumulation, 1, 1024)
        _in_range("--check-seeds", self.check_seeds, 1, 16)
        _in_range("--check-steps", self.check_steps, 1, 200)
        _in_range("--save-every", self.save_every, 0, self.steps)
        _in_range("--seed", self.seed, 0, 2**63 - 1)
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 64):
            raise InputError(f"--resolution must be a multiple of 64 and at least 64, not {self.resolution}.")
        if not 0 < self.lr <= 1:
            raise InputError(f"--lr must be in (0, 1], not {self.lr}.")
        if self.alpha <= 0:
            raise InputError(f"--alpha must be positive, not {self.alpha}.")
        if self.noise_offset < 0 or (self.min_snr_gamma is not None and self.min_snr_gamma <= 0):
            raise InputError("--noise-offset must be ≥ 0 and --min-snr-gamma > 0.")
        if not 0 <= self.multires_noise < 1:
            raise InputError(f"--multires-noise is a weight in [0, 1), not {self.multires_noise}.")
        if not 0 <= self.pure_noise < 1:
            raise InputError(f"--pure-noise is a fraction of the steps in [0, 1), not {self.pure_noise}.")
        _one_of("--optimizer", self.optimizer, OPTIMIZERS)
        _one_of("--mixed-precision", self.mixed_precision, MIXED_PRECISIONS)
        if self.quantize_base is not None:
            _one_of("--quantize-base", self.quantize_base, QUANTIZATIONS)
        if self.check_every is None:
            self.check_every = max(1, self.steps // 10)
        _in_range("--check-every", self.check_every, 0, self.steps)
        if not isinstance(self.stop_when_copied, bool):  # an older config's number (or None)
            if self.stop_when_copied is not None:
                self.copy_target = float(self.stop_when_copied)
            self.stop_when_copied = self.stop_when_copied is not None
        if not 0 < self.copy_target <= 100:
            raise InputError(f"--copy-target is a PSNR in dB, in (0, 100], not {self.copy_target}.")
        if self.stop_when_copied and not self.check_every:
            self.stop_when_copied = False  # --check-every 0: nothing to stop on; the budget is the run
        for spec in self.base_lora_weights():  # now, so a typo fails before any model loads
            check_file(spec.path)

    # class constants, not fields
    MODE_DEFAULTS = {"lr": COPY_LR, "noise_offset": COPY_NOISE_OFFSET}
    ONE_IMAGE_DEFAULTS = {"multires_noise": COPY_MULTIRES_NOISE, "conv_rank": COPY_CONV_RANK}  # a --pair: OFF
    OFF = {"multires_noise": 0.0, "conv_rank": 0}

    def check_vary(self) -> None:
        self.vary = parse_vary(self.vary)
        mode = getattr(self, "mode", "copy")
        if self.vary and mode != "copy":
            raise InputError(f"--vary is for copy mode's halves of a slider (--pair A B); drop it with --mode {mode}.")

    def apply_mode_defaults(self) -> None:
        """Unset learning rate, noise settings and conv rank take this mode's defaults (a --pair's halves: OFF),
        so outputs record the values used."""
        for name, value in (self.MODE_DEFAULTS | (self.OFF if self.pair else self.ONE_IMAGE_DEFAULTS)).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

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
class SliderConfig(TrainConfig):
    """Slider mode (recipe 3): ONE LoRA trained on a pair, so that at scale +1 the base renders image A from the
    empty prompt and at −1 image B; both halves of a step see the same noise and timestep. Copy mode's options
    apply (the copy check renders +1 against A and −1 against B).

    With --positive/--negative instead of images it is a text slider (recipe 4, train.slider): no images, no
    copy check, no pure or offset noise."""

    mode: str = "slider"
    ONE_IMAGE_DEFAULTS = TrainConfig.OFF  # one LoRA on a pair is a slider: see COPY_MULTIRES_NOISE
    positive: str | None = option(
        None, "Text slider: the +1 end as a prompt, e.g. 'a large circle' (with --negative; no images).", modes=TEXT
    )
    negative: str | None = option(None, "Text slider: the −1 end as a prompt, e.g. 'a small circle'.", modes=TEXT)
    target: str = option("", "Text slider: the prompt it is trained (and meant to be used) in, e.g. 'a circle'.",
                         modes=TEXT)  # fmt: skip
    strength: float = option(1.0, "Text slider: ±1 adds ± this × (positive − negative) to the noise estimate.",
                             modes=TEXT)  # fmt: skip
    renders: int = option(16, "Text slider: base renders of --target whose noised latents it trains on.", modes=TEXT)

    @property
    def text(self) -> bool:
        """A text slider (Concept Sliders' way: from two prompts), not one trained on a pair of images."""
        return self.positive is not None or self.negative is not None

    def apply_mode_defaults(self) -> None:
        """A text slider trains on the base's own renders toward the model's own text direction: copy mode's
        pure noise and offset noise (remedies for copying a colour from the seed) do not apply."""
        if self.text:
            self.noise_offset = 0.0 if self.noise_offset is None else self.noise_offset
            self.pure_noise, self.check_every, self.stop_when_copied = 0.0, 0, False
        super().apply_mode_defaults()

    def check_inputs(self) -> None:
        if self.text:
            if not (self.positive or "").strip() or not (self.negative or "").strip():
                raise InputError("a text slider needs both --positive and --negative, e.g. 'a large circle'.")
            if self.images:
                raise InputError("a text slider is trained from --positive/--negative: drop the images (or --pair).")
            if self.positive == self.negative:
                raise InputError("--positive and --negative are the same prompt: the slider would learn nothing.")
            if not 0 < self.strength <= 20:
                raise InputError(f"--strength must be in (0, 20], not {self.strength}.")
            _in_range("--renders", self.renders, 1, 10_000)
            return
        if len(self.images) != 2:
            raise InputError(
                f"--mode slider trains on a pair: --pair A.png B.png (+1 → A, −1 → B), got {len(self.images)} images;"
                " or from two prompts: --positive P --negative N."
            )
        self.pair = True

    def lora_paths(self) -> list[Path]:
        return [self.output]  # one slider, not a prefix


@dataclass
class DreamboothConfig(TrainConfig):
    """Dreambooth: a UNet (and optionally text-encoder) LoRA on a folder of captioned images, with optional
    prior preservation; mode "wrong" first generates its own folder of failure images (trigger word `wrong`).

    `images` holds the instance folder (dreambooth) or nothing (wrong). The copy check does not apply.
    """

    mode: str = "dreambooth"  # the CLI's --mode picks this class
    prompt: str = option("", "Instance prompt (a .txt caption beside an image wins).", modes=("dreambooth",))
    class_prompt: str | None = option(None, "Prior preservation: the class, e.g. 'a photo of a dog'.", modes=BOOTH)
    class_dir: Path | None = option(
        None, "Class images; missing ones are generated (default <out>.class).", modes=BOOTH
    )
    num_class_images: int = option(100, "Class images for prior preservation.", modes=BOOTH)
    prior_loss_weight: float = option(1.0, "Loss = instance MSE + this × class MSE.", modes=BOOTH)
    batch_size: int = option(1, "Images per step, all from one aspect bucket.", modes=BOOTH)
    cache_dir: Path | None = option(None, "Keep latents and prompt embeddings on disk for later runs.", modes=BOOTH)
    train_text_encoder: bool = option(False, "LoRAs on both text encoders too.", modes=BOOTH)
    generate_steps: int = option(25, "Sampling steps per generated class or wrong image.", modes=BOOTH)
    num_images: int = option(100, "Failure images to generate.", modes=("wrong",))
    wrong_dir: Path | None = option(None, "The failure images' folder (default <out>.wrong), reused.", modes=("wrong",))
    check_every: int | None = 0
    stop_when_copied: bool | float | None = False
    pure_noise: float = 0.0
    MODE_DEFAULTS = {"lr": 1e-4, "noise_offset": 0.0}
    ONE_IMAGE_DEFAULTS = TrainConfig.OFF

    def check_inputs(self) -> None:
        if self.mode not in BOOTH:
            raise InputError(f"--mode must be {', '.join(MODES[:-1])} or {MODES[-1]}, not {self.mode!r}.")
        if self.pair:
            raise InputError(f"--pair is a copy-mode option; drop it with --mode {self.mode}.")
        if self.check_every or self.stop_when_copied:
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
