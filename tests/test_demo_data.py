"""The demo model's data: seeded scenes, one-attribute pairs, measurements, and a reproducible tiny build."""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from loratool.demo import shapes


def test_same_seed_same_bytes_other_seed_other_images():
    a, scenes_a = shapes.render_many(12, seed=5)
    b, scenes_b = shapes.render_many(12, seed=5)
    c, _ = shapes.render_many(12, seed=6)
    assert a.tobytes() == b.tobytes() and scenes_a == scenes_b
    assert a.tobytes() != c.tobytes()
    part, _ = shapes.render_many(4, seed=5, start=8)  # chunks rendered apart equal the whole
    assert part.tobytes() == a[8:].tobytes()


def _outside(scene_a: shapes.Scene, scene_b: shapes.Scene) -> np.ndarray:
    mask = np.ones((shapes.SIZE, shapes.SIZE), dtype=bool)
    for x0, y0, x1, y1 in (scene_a.box, scene_b.box):
        mask[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = False
    return mask


@pytest.mark.parametrize("concept", shapes.CONCEPTS)
@pytest.mark.parametrize("seed", range(6))
def test_pair_differs_in_exactly_one_attribute(concept, seed):
    img_a, img_b, scene_a, scene_b = shapes.concept_pair(concept, seed)
    fa, fb = asdict(scene_a), asdict(scene_b)
    assert [k for k in fa if fa[k] != fb[k]] == [concept]
    pa, pb = np.asarray(img_a), np.asarray(img_b)
    outside = _outside(scene_a, scene_b)
    assert (pa[outside] == pb[outside]).all(), "pixels outside the shapes must be identical"
    assert (pa != pb).any(axis=-1).sum() > 100
    lo, hi = shapes.measure(img_a, concept), shapes.measure(img_b, concept)
    margin = {"size": 500, "colour": 150, "position": 40}[concept]
    assert hi - lo > margin, (concept, lo, hi)


def test_captions_use_only_single_token_words():
    from loratool.sdxl.tiny import DEFAULT_WORDS, build_tokenizer

    tokenizer = build_tokenizer()
    scenes = [shapes.scene_for(0, i, backgrounds=tuple(shapes.BACKGROUNDS)) for i in range(300)]
    words = {w for s in scenes for w in s.caption.split()}
    assert words <= set(DEFAULT_WORDS)
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.parametrize("concept", shapes.CONCEPTS)
def test_the_sweep_context_is_the_pairs_shared_caption_without_the_concept(concept):
    _, _, minus, plus = shapes.concept_pair(concept, seed=3)
    context = minus.caption_without(concept)
    assert context == plus.caption_without(concept)
    dropped = set(minus.caption.split()) - set(context.split())
    differing = set(minus.caption.split()) ^ set(plus.caption.split())
    assert differing and differing - set(plus.caption.split()) <= dropped  # the minus image's concept words
    assert context.split()[0] == "a" and minus.shape in context.split()


def test_every_tiny_word_is_one_token():
    """Regression: words sharing pieces with earlier ones ("green" after "red") used to split into 4 tokens."""
    from loratool.sdxl.tiny import DEFAULT_WORDS, build_tokenizer

    tokenizer = build_tokenizer()
    assert [w for w in DEFAULT_WORDS if len(tokenizer(w, add_special_tokens=False).input_ids) != 1] == []
    ids = tokenizer(" ".join(DEFAULT_WORDS), add_special_tokens=False).input_ids
    assert len(ids) == len(DEFAULT_WORDS) == len(set(ids))


def test_describe_recovers_what_was_drawn():
    images, scenes = shapes.render_many(300, seed=11, backgrounds=tuple(shapes.BACKGROUNDS))
    seen = [shapes.describe(img) for img in images]
    for attribute in ("colour", "position", "size", "shape"):
        rate = np.mean([getattr(d, attribute) == getattr(s, attribute) for d, s in zip(seen, scenes, strict=True)])
        assert rate >= 0.95, (attribute, rate)


def test_normalised_latents_decode_the_same_and_have_unit_scale():
    from diffusers import AutoencoderKL

    from loratool.demo.vae import encode, normalise_latents, to_float
    from loratool.sdxl.tiny import TinySpec, vae_config

    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config(TinySpec())).eval()
    images = torch.from_numpy(shapes.render_many(8, seed=1)[0]).permute(0, 3, 1, 2)[:, :, ::2, ::2].contiguous()
    with torch.no_grad():
        before = vae.decode(vae.encode(to_float(images)).latent_dist.mode()).sample
        normalise_latents(vae, images)
        after = vae.decode(vae.encode(to_float(images)).latent_dist.mode()).sample
    assert torch.allclose(before, after, atol=1e-4)
    z = encode(vae, images)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-3 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


def test_tiny_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from loratool.demo.build import BuildConfig, build
    from loratool.sdxl.tiny import TinySpec

    def run(out):
        cfg = BuildConfig(out=out, device="cpu", steps=(3, 3, 3), images=16, size=64, vae_batch=2, unet_batch=4)
        cfg.spec = TinySpec()
        return build(cfg)

    report = run(tmp_path / "a")
    run(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 7  # base: te1, te2, unet, vae; refiner: te2, unet, vae
    for f in files:
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
        assert all(t.dtype == torch.float16 for t in a.values()), f
    assert report["base_steps"] == report["refiner_steps"] == 3 and np.isfinite(report["vae_psnr_db"])
