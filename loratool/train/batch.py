"""What one training step sees: batches of cached latents with their conditioning, drawn from a data source.

A source yields, per step, the batches whose losses make that step's loss: copy mode one fixed batch,
slider mode image A at LoRA scale +1 and image B at −1 (with the same noise: `same_noise`), dreambooth an
instance batch plus (with prior preservation) a class batch. Every batch comes from ONE
aspect bucket, so its latents stack. Batches are drawn with the loop's generator (a resumed run draws
the same ones) and are global: under data parallelism each process takes its rows (`shard`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class Guide:
    """A text slider's target: the base's own noise estimate in the batch's prompt, plus lora_scale × strength ×
    (its estimate with `plus` − with `minus`), each a (prompt_embeds (1, 77, D), pooled (1, P)) pair.

    `estimates` keeps the last inputs and outputs of those LoRA-off estimates (`loss.text_slider_target`): a
    step's batches share noise and timestep, so the other batches of the step reuse them."""

    plus: tuple[torch.Tensor, torch.Tensor]
    minus: tuple[torch.Tensor, torch.Tensor]
    strength: float
    estimates: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 4, h/8, w/8), times the VAE's scaling factor
    time_ids: torch.Tensor  # (B, 6): original size, crop top-left, target size
    captions: list[str]
    prompt_embeds: torch.Tensor | None = None  # (B, 77, te1 + te2 width); None: encode `captions` each step
    pooled: torch.Tensor | None = None
    prior: bool = False  # a class-image batch (prior preservation)
    lora_scale: float = 1.0  # the LoRA's scale while this batch trains (slider mode: +1 or −1)
    guide: Guide | None = None  # a text slider's batch: the target is the guided base estimate, not the noise

    def shard(self, index: int, count: int) -> Batch:
        """Rows index, index + count, …: this process's share of a global batch."""
        if count == 1:
            return self
        rows = slice(index, None, count)
        embeds = None if self.prompt_embeds is None else self.prompt_embeds[rows]
        pooled = None if self.pooled is None else self.pooled[rows]
        latents, time_ids, captions = self.latents[rows], self.time_ids[rows], self.captions[rows]
        return Batch(latents, time_ids, captions, embeds, pooled, self.prior, self.lora_scale, self.guide)


class OneBatch:
    """Copy mode: the same single-image batch at every step."""

    same_noise = False

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def draw(self, generator: torch.Generator) -> list[Batch]:
        return [self.batch]

    def eval_batches(self) -> list[Batch]:
        return [self.batch]


class Variants:
    """A --pair half with --vary: one of its image's varied versions per step (index 0 is the image itself,
    which the copy check compares against)."""

    same_noise = False

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def draw(self, generator: torch.Generator) -> list[Batch]:
        pick = int(torch.randint(len(self.batches), (1,), generator=generator, device=generator.device))
        return [self.batches[pick]]

    def eval_batches(self) -> list[Batch]:
        return self.batches[:1]


class PairBatches:
    """Slider mode: image A at LoRA scale +1 and image B at −1 at every step, both from the same noise and
    timestep, so the step's gradient is the difference between the two and nothing else."""

    same_noise = True

    def __init__(self, plus: Batch, minus: Batch) -> None:
        self.batches = [replace(plus, lora_scale=1.0), replace(minus, lora_scale=-1.0)]

    def draw(self, generator: torch.Generator) -> list[Batch]:
        return self.batches

    def eval_batches(self) -> list[Batch]:
        return self.batches


class RenderBatches:
    """A text slider: per step, `size` of the base's own renders, in each context prompt at LoRA scale +1 and −1,
    all from the same noise and timestep; the batches' `guide` says what each scale should predict.

    `latents` (N, 4, h/8, w/8) are the renders, `time_ids` (1, 6) theirs; `contexts` are (caption, embeds
    (1, 77, D), pooled) triples.
    """

    same_noise = True

    def __init__(self, latents: torch.Tensor, time_ids: torch.Tensor, contexts: list[tuple], guide: Guide,
                 size: int) -> None:  # fmt: skip
        self.latents, self.time_ids, self.contexts, self.guide, self.size = latents, time_ids, contexts, guide, size

    def _rows(self, rows: list[int]) -> list[Batch]:
        n, batches = len(rows), []
        for caption, embeds, pooled in self.contexts:
            batch = Batch(self.latents[rows], self.time_ids.expand(n, -1), [caption] * n, embeds.expand(n, -1, -1),
                          pooled.expand(n, -1))  # fmt: skip
            batches += [replace(batch, lora_scale=s, guide=self.guide) for s in (1.0, -1.0)]
        return batches

    def draw(self, generator: torch.Generator) -> list[Batch]:
        n = self.latents.shape[0]
        return self._rows(torch.randint(n, (self.size,), generator=generator, device=generator.device).tolist())

    def eval_batches(self) -> list[Batch]:
        return self._rows(list(range(min(self.size, self.latents.shape[0]))))


@dataclass
class Example:
    latent: torch.Tensor  # (4, h/8, w/8)
    time_ids: list[int]
    caption: str

    @property
    def bucket(self) -> tuple[int, int]:
        return tuple(self.latent.shape[-2:])


@dataclass
class Pool:
    """Examples grouped by bucket; captions' embeddings stored once per caption, not per image."""

    examples: list[Example]
    embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] | None  # caption → ((77, D), (P,)); None: re-encode
    prior: bool = False
    groups: dict[tuple[int, int], list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.groups = defaultdict(list)
        for i, example in enumerate(self.examples):
            self.groups[example.bucket].append(i)

    def draw(self, size: int, generator: torch.Generator) -> Batch:
        """A random example, then size - 1 more from its bucket (with replacement: any bucket size works)."""
        device = generator.device
        first = int(torch.randint(len(self.examples), (1,), generator=generator, device=device))
        members = self.groups[self.examples[first].bucket]
        more = torch.randint(len(members), (size - 1,), generator=generator, device=device).tolist()
        return self.stack([first] + [members[j] for j in more])

    def stack(self, indices: list[int]) -> Batch:
        chosen = [self.examples[i] for i in indices]
        captions = [e.caption for e in chosen]
        embeds = pooled = None
        if self.embeds is not None:
            embeds = torch.stack([self.embeds[c][0] for c in captions])
            pooled = torch.stack([self.embeds[c][1] for c in captions])
        latents = torch.stack([e.latent for e in chosen])
        time_ids = torch.tensor([e.time_ids for e in chosen], dtype=torch.float32, device=latents.device)
        return Batch(latents, time_ids, captions, embeds, pooled, self.prior)


class BucketSource:
    """Dreambooth: per step, a batch of instance images and (with prior preservation) one of class images."""

    same_noise = False

    def __init__(self, instance: Pool, prior: Pool | None, batch_size: int) -> None:
        self.instance, self.prior, self.batch_size = instance, prior, batch_size

    def draw(self, generator: torch.Generator) -> list[Batch]:
        batches = [self.instance.draw(self.batch_size, generator)]
        if self.prior is not None:
            batches.append(self.prior.draw(self.batch_size, generator))
        return batches

    def eval_batches(self) -> list[Batch]:
        """The first images of every instance bucket (fixed, so the eval loss is comparable across steps)."""
        return [self.instance.stack(members[: self.batch_size]) for members in self.instance.groups.values()]
