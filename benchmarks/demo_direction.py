"""How far the demo model's own caption direction glides: no LoRA, no training. One JSON line, every concept in it.

    python benchmarks/demo_direction.py --concepts size,colour,position --seeds 8 [--strength 1.0] [--pair-seed N]
        [--sheet DIR] [--weights DIR]

For each concept's pair (the demo's, or the one `loratool demo --pair-seed N` draws), every base step predicts
ε(prompt) + s · strength · (ε(plus caption) − ε(minus caption)) at s = −1, −0.5, 0, 0.5, 1, in the pair's
scene minus the concept (the demo's sweep prompt), base + refiner as `loratool demo` samples; the renders are
measured as the demo measures a slider (demo.evaluation). This is what a text slider (recipe 4) is trained
to reproduce, so it is the lab's own ceiling for that recipe: when this already jumps, the model, not the
recipe, is what switches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loratool import libraries

SCALES = [-1.0, -0.5, 0.0, 0.5, 1.0]


def guided_unet(unet, plus: tuple, minus: tuple, strength: float) -> dict:
    """Wrap unet.forward: every call gets `state["s"]` × strength × (ε with plus − ε with minus) added."""
    forward, state = unet.forward, {"s": 0.0}

    def call(sample, t, encoder_hidden_states=None, added_cond_kwargs=None, **kw):
        out = forward(sample, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kw)
        if not state["s"]:
            return out
        n, time_ids = sample.shape[0], added_cond_kwargs["time_ids"]
        eps = [
            forward(sample, t, encoder_hidden_states=e.expand(n, -1, -1),
                    added_cond_kwargs={"text_embeds": p.expand(n, -1), "time_ids": time_ids}, **kw)[0]
            for e, p in (plus, minus)
        ]  # fmt: skip
        return (out[0] + state["s"] * strength * (eps[0] - eps[1]), *out[1:])

    unet.forward = call
    return state


def run_concept(
    base, refiner, concept: str, seeds: list[int], strength: float, pair_seed: int, sheet: Path | None
) -> dict:
    import torch

    from loratool.demo import shapes
    from loratool.demo.evaluation import evaluate
    from loratool.train.slider import embed

    minus_image, plus_image, minus, plus = shapes.concept_pair(concept, pair_seed)
    prompt = plus.caption_without(concept)
    forward = base.unet.forward
    state = guided_unet(base.unet, embed(base, plus.caption), embed(base, minus.caption), strength)
    images = {}
    for seed in seeds:
        for s in SCALES:
            state["s"], generator = s, torch.Generator("cpu").manual_seed(seed)
            common = dict(prompt=prompt, num_inference_steps=20, guidance_scale=5.0, generator=generator)
            latent = base(**common, width=128, height=128, denoising_end=0.8, output_type="latent").images
            state["s"] = 0.0  # the refiner has no slider either when `sample` sweeps one
            images[(seed, s)] = refiner(**common, image=latent, denoising_start=0.8).images[0]
    base.unet.forward = forward
    pair = (shapes.measure(minus_image, concept), shapes.measure(plus_image, concept))
    result = evaluate(images, SCALES, seeds, concept, pair)
    if sheet is not None:
        from PIL import Image

        grid = Image.new("RGB", (128 * len(SCALES), 128 * len(seeds)), "white")
        for i, seed in enumerate(seeds):
            for j, s in enumerate(SCALES):
                grid.paste(images[(seed, s)], (128 * j, 128 * i))
        sheet.mkdir(parents=True, exist_ok=True)
        grid.save(sheet / f"direction-{concept}-{pair_seed}.png")
    return {"prompt": prompt, "plus": plus.caption, "minus": minus.caption, "in_prompt": result["summary"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", default="size,colour,position")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--pair-seed", type=int, default=0, help="which pair of each concept (0: the demo's)")
    p.add_argument("--sheet", type=Path, default=None, help="write a seeds × scales sheet per concept here")
    p.add_argument("--weights", type=Path, default=None, help="demo model folder to use instead of the shipped one")
    a = p.parse_args()
    libraries.quiet()  # only the results and our own progress on stdout/stderr
    import torch

    from loratool.sdxl import models

    if a.weights is not None:
        models.DEMO_WEIGHTS = a.weights.resolve()
    torch.set_num_threads(1)
    base, refiner = models.load_models("demo", "demo", models.pick_runtime("cpu"))
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    seeds = list(range(a.seeds))
    concepts = [c for c in a.concepts.split(",") if c]
    result = {c: run_concept(base, refiner, c, seeds, a.strength, a.pair_seed, a.sheet) for c in concepts}
    weights = str(a.weights) if a.weights else "shipped"
    line = {"benchmark": "demo_direction", "weights": weights, "strength": a.strength, "seeds": a.seeds}
    line |= {"pair_seed": a.pair_seed}
    print(json.dumps({**line, "concepts": result}))


if __name__ == "__main__":
    main()
