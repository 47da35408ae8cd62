"""Reference-only guidance (`sample --reference IMAGE`): pull a render toward an image's style, colours and
character with nothing trained (issue 16).

Every denoising step the UNet first runs a *write* pass on the reference latent, noised to the step's timestep
with the render's own starting noise, and then the usual *read* pass on x:
  attn   each self-attention of the transformer blocks keeps its input tokens (write), then attends to
         [own tokens ‖ reference tokens] (read);
  adain  the transformer blocks' inputs and the ResNet outputs of the stages without attention keep their
         per-channel mean and variance (write), then are renormalised to them (read).
Variant `coarse` does this on both halves of the CFG batch. `fine` does it on the conditional half and gives
the unconditional half style_fidelity·(without reference) + (1 − style_fidelity)·(with reference), so
guidance itself pushes toward the reference (the diffusers community pipeline, ControlNet's "balanced" mode);
fine at fidelity 0 is coarse. `weight` W is the share of layers that take part, widest (coarsest) first, as
ControlNet's control weight: 0 leaves the model alone, 1 uses every layer.

`Guide` installs all of it on one UNet as a context manager: attention processors through diffusers'
`set_attn_processor`, statistics and the write pass through torch forward hooks. On exit the original
processors are set back and every hook removed, so the pipeline renders as a fresh one does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.data.images import load_image, prepare
from loratool.errors import InputError
from loratool.files import sha256
from loratool.train.conditioning import encode_latent

log = logging.getLogger(__name__)

EPS = 1e-6  # floor of a variance before its square root


@dataclass(frozen=True)
class Reference:
    """What `--reference` asks for, checked, and what every output records about it."""

    path: Path
    sha256: str
    mode: str  # attn | adain | attn+adain
    variant: str  # coarse | fine
    style_fidelity: float | None  # fine only
    weight: float
    refiner: bool  # the refiner is guided too

    @property
    def attn(self) -> bool:
        return "attn" in self.mode

    @property
    def adain(self) -> bool:
        return "adain" in self.mode

    def record(self) -> dict:
        fields = ("mode", "variant", "style_fidelity", "weight", "refiner")
        return {"file": str(self.path), "sha256": self.sha256} | {k: getattr(self, k) for k in fields}


def read_reference(config) -> Reference | None:
    """The checked reference of a SampleConfig (None without one); a missing or unreadable image fails here,
    before any model loads."""
    if config.reference is None:
        return None
    path = Path(config.reference)
    try:
        load_image(path)
    except InputError as exc:
        raise InputError(f"--reference: {exc}") from None
    return Reference(
        path,
        sha256(path),
        config.reference_mode,
        config.reference_variant,
        config.style_fidelity,
        config.reference_weight,
        config.reference_refiner,
    )


def guides(base, refiner, reference: Reference | None, size: tuple[int, int], cfg: bool) -> list[Guide]:
    """Guides (not yet entered) for the base and, if asked, the refiner; none at weight 0. `size` is the
    render's (width, height): the reference is bucketed near its area, like a training image."""
    if reference is None or reference.weight == 0.0:
        return []
    resolution = max(64, round(math.sqrt(size[0] * size[1]) / 64) * 64)
    image = prepare(reference.path, resolution)
    vae = base.vae
    dtype = vae.dtype
    latent = encode_latent(vae, image.pixels[None])
    if vae.dtype != dtype:
        vae.to(dtype)  # encode_latent works in fp32; give the pipeline its VAE back as it was
    if reference.refiner and refiner is None:
        log.warning("--reference-refiner: this run has no refiner; the base alone is guided.")
    pipes = [base, refiner] if reference.refiner and refiner is not None else [base]
    return [Guide(pipe, reference, latent, image.time_ids(), cfg) for pipe in pipes]


class _WriteDone(Exception):
    """Raised by the last layer that keeps anything: the rest of the write pass is skipped."""


class _Switch:
    """What every processor and hook of one Guide reads: the pass under way and how the CFG batch is split."""

    def __init__(self, fidelity: float):
        self.mode = "off"  # off | write | read
        self.fidelity = fidelity
        self.uncond = 0  # rows of the batch that are the unconditional half
        self.order: list[int] = []  # ids of the keeping layers in the order the first write pass met them
        self.last: int | None = None  # the last of them, once known

    def kept(self, layer: object) -> None:
        """A layer has kept what it needs; after the last one nothing of the write pass is used. The first
        pass runs whole to learn which layer that is (forward order is the UNet's business, not ours)."""
        if self.last is None:
            self.order.append(id(layer))
        elif id(layer) == self.last:
            raise _WriteDone

    def blend(self, with_ref: torch.Tensor, without) -> torch.Tensor:
        """Fine variant: the unconditional rows get fidelity·without(rows) + (1 − fidelity)·with_ref."""
        if self.uncond == 0 or self.fidelity == 0.0:
            return with_ref
        out = with_ref.clone()
        rows = slice(0, self.uncond)
        out[rows] = self.fidelity * without(rows) + (1.0 - self.fidelity) * with_ref[rows]
        return out


class ReferenceAttnProcessor:
    """Wraps a self-attention's processor: write keeps its tokens, read attends to [own ‖ reference]."""

    def __init__(self, inner, switch: _Switch):
        self.inner, self.switch, self.bank = inner, switch, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        def attend(h, context=None):
            return self.inner(attn, h, encoder_hidden_states=context, attention_mask=attention_mask, temb=temb)

        if self.switch.mode == "write":
            self.bank = hidden_states
            self.switch.kept(self)
        if self.switch.mode != "read" or self.bank is None:
            return attend(hidden_states, encoder_hidden_states)
        with_ref = attend(hidden_states, torch.cat([hidden_states, self.bank], dim=1))
        return self.switch.blend(with_ref, lambda rows: attend(hidden_states[rows]))


class _Statistics:
    """AdaIN at one place in the UNet: write keeps per-channel mean and std, read renormalises to them."""

    def __init__(self, switch: _Switch):
        self.switch, self.mean, self.std = switch, None, None

    def __call__(self, h: torch.Tensor) -> torch.Tensor | None:
        if self.switch.mode == "write":
            var, self.mean = torch.var_mean(h, dim=(2, 3), keepdim=True, correction=0)
            self.std = var.clamp_min(EPS).sqrt()
            self.switch.kept(self)
        if self.switch.mode != "read" or self.mean is None:
            return None
        var, mean = torch.var_mean(h, dim=(2, 3), keepdim=True, correction=0)
        normed = (h - mean) / var.clamp_min(EPS).sqrt() * self.std + self.mean
        return self.switch.blend(normed, lambda rows: h[rows])


def _widest_first(named: list[tuple[str, int]], weight: float) -> set[str]:
    """The first ceil(weight·n) names by width, widest first (ties keep the UNet's order)."""
    ordered = sorted(named, key=lambda x: -x[1])
    return {name for name, _ in ordered[: math.ceil(weight * len(ordered) - 1e-9)]}


class Guide:
    """Reference guidance on one pipeline's UNet for the length of a `with` block."""

    def __init__(self, pipe, reference: Reference, latent: torch.Tensor, time_ids: list[int], cfg: bool):
        self.pipe, self.reference, self.cfg = pipe, reference, cfg
        self.latent, self.time_ids = latent, time_ids
        self.switch = _Switch(reference.style_fidelity if reference.variant == "fine" else 0.0)
        self.noise = None
        self._saved, self._handles = None, []

    def start(self, seed: int) -> None:
        """The starting noise of the render with this seed: drawn as the pipeline draws its initial latents, so
        where the reference latent has the render's shape it is the very same noise."""
        generator = torch.Generator("cpu").manual_seed(seed)
        self.noise = torch.randn(self.latent.shape, generator=generator, dtype=self.pipe.unet.dtype)

    def __enter__(self) -> Guide:
        unet = self.pipe.unet
        if self.reference.attn:
            self._saved = unet.attn_processors
            width = {n: unet.get_submodule(n.removesuffix(".processor")).query_dim for n in self._saved}
            chosen = _widest_first([(n, w) for n, w in width.items() if ".attn1." in n], self.reference.weight)
            procs = {n: ReferenceAttnProcessor(p, self.switch) if n in chosen else p for n, p in self._saved.items()}
            unet.set_attn_processor(procs)
        if self.reference.adain:
            self._hook_statistics(unet)
        self._handles.append(unet.register_forward_pre_hook(self._write_first, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._saved is not None:
            self.pipe.unet.set_attn_processor(self._saved)
            self._saved = None
        self.switch.mode = "off"

    def _hook_statistics(self, unet) -> None:
        """Pre-hooks on the transformer blocks' inputs, hooks on the ResNet outputs of stages without attention."""
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        places = {name: m for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)}
        for block_name in ("down_blocks", "up_blocks"):
            for i, block in enumerate(getattr(unet, block_name)):
                if not hasattr(block, "attentions"):
                    places |= {f"{block_name}.{i}.resnets.{j}": r for j, r in enumerate(block.resnets)}
        width = [(n, m.in_channels if isinstance(m, Transformer2DModel) else m.out_channels) for n, m in places.items()]
        for name in _widest_first(width, self.reference.weight):
            stats, module = _Statistics(self.switch), places[name]
            if isinstance(module, Transformer2DModel):
                self._handles.append(module.register_forward_pre_hook(_on_input(stats), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(lambda m, a, out, s=stats: s(out)))

    def _write_first(self, unet, args, kwargs):
        """Before each read pass: the write pass, on the reference noised to this step's timestep."""
        if self.switch.mode == "write":
            return None
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        rest = {k: v for k, v in kwargs.items() if k not in ("sample", "timestep")}
        cond = dict(rest["added_cond_kwargs"])
        cond["time_ids"] = self._reference_time_ids(cond["time_ids"])
        rest |= {"added_cond_kwargs": cond, "return_dict": False}
        self.switch.uncond = sample.shape[0] // 2 if self.cfg else 0
        self.switch.mode = "write"
        try:
            unet(self._noised(timestep, sample), timestep, *args[2:], **rest)
        except _WriteDone:
            pass
        finally:
            self.switch.mode = "read"
        if self.switch.last is None and self.switch.order:
            self.switch.last = self.switch.order[-1]
        return None

    def _noised(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        scheduler = self.pipe.scheduler
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        latent = self.latent.to(sample.device, torch.float32)
        noisy = scheduler.add_noise(latent, self.noise.to(latent), t.reshape(1).to(sample.device))
        noisy = scheduler.scale_model_input(noisy, timestep)
        return noisy.to(sample.dtype).expand(sample.shape[0], -1, -1, -1)

    def _reference_time_ids(self, time_ids: torch.Tensor) -> torch.Tensor:
        """The step's time ids with the reference's own original size and crop (and target size on the base;
        a refiner's last id is the aesthetic score, which stays)."""
        ids = time_ids.clone()
        ref = torch.tensor(self.time_ids, dtype=ids.dtype, device=ids.device)
        width = 6 if ids.shape[1] == 6 else 4
        ids[:, :width] = ref[:width]
        return ids


def _on_input(stats: _Statistics):
    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        new = stats(h)
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, kwargs | {"hidden_states": new})

    return hook
