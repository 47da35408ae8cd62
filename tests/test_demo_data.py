"""The demo model's data: seeded scenes, one-attribute pairs, progress on a pair's scale, captions, a
reproducible tiny build, and the quality check's output. The reader (`describe`) is in test_demo_reader.py."""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image

from loratool.demo import shapes
from loratool.metrics import spearman


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
@pytest.mark.parametrize("seed", range(8))
def test_pair_differs_in_exactly_one_attribute(concept, seed):
    img_a, img_b, scene_a, scene_b = shapes.concept_pair(concept, seed)
    fa, fb = asdict(scene_a), asdict(scene_b)
    assert [k for k in fa if fa[k] != fb[k]] == [shapes.FIELD[concept]]
    pa, pb = np.asarray(img_a), np.asarray(img_b)
    outside = _outside(scene_a, scene_b)
    assert (pa[outside] == pb[outside]).all(), "pixels outside the shapes must be identical"
    assert (pa != pb).any(axis=-1).sum() > 100
    for scene in (scene_a, scene_b):  # both shapes whole inside the frame
        x0, y0, x1, y1 = scene.box
        assert x0 >= 0 and y0 >= 0 and x1 < shapes.SIZE and y1 < shapes.SIZE, scene
    lo, hi = shapes.measure(img_a, concept), shapes.measure(img_b, concept)
    gap = abs(shapes.hue_difference(lo, hi)) if concept == "colour" else abs(hi - lo)
    assert gap > {"size": 400, "colour": 80, "position": 35}[concept], (concept, lo, hi)
    assert shapes.progress(lo, concept, lo, hi) == pytest.approx(0.0, abs=1e-12)
    assert shapes.progress(hi, concept, lo, hi) == pytest.approx(1.0)


def test_pairs_go_both_ways_and_vary_the_scene():
    pairs = [shapes.concept_pair(c, seed)[2:] for c in shapes.CONCEPTS for seed in range(12)]
    ups = [
        getattr(b, shapes.FIELD[c]) > getattr(a, shapes.FIELD[c])
        for c, (a, b) in zip([c for c in shapes.CONCEPTS for _ in range(12)], pairs, strict=True)
    ]
    assert 0 < sum(ups) < len(ups)
    assert len({a.shape for a, _ in pairs}) == 3 and len({a.colour for a, _ in pairs}) >= 4


@pytest.mark.parametrize("value", [0.0, 0.25, 0.5, 1.0, 1.5, -0.5])
def test_progress_is_zero_at_minus_one_at_plus_and_linear_between(value):
    assert shapes.progress(10 + value * 20, "size", 10, 30) == pytest.approx(value)
    assert shapes.progress(90 - value * 40, "position", 90, 50) == pytest.approx(value)
    # hue along the shorter arc: red (0) → purple (280) passes through 320, not through green
    assert shapes.progress((0 - value * 80) % 360, "colour", 0.0, 280.0) == pytest.approx(value)


@pytest.mark.parametrize("minus, plus", [(306.0, 200.0), (55.0, 204.0), (0.0, 280.0), (350.0, 10.0)])
def test_a_sweep_is_read_along_the_arc_through_its_scale_0_hue(minus, plus):
    """A scale-0 render off the pair's shorter arc means the sweep reaches both ends the long way round: read
    there, a hue walk minus → via → plus rises evenly; one on the shorter arc reads as it did without `via`."""
    short = shapes.hue_difference(minus, plus)
    long_ = short - np.copysign(360.0, short)
    walk = [(minus + f * long_) % 360 for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    read = [shapes.progress(h, "colour", minus, plus, via=walk[2]) for h in walk]
    assert read == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert spearman([0, 1, 2, 3, 4], [shapes.progress(h, "colour", minus, plus) for h in walk]) < 1  # no `via`
    on_short = (minus + 0.4 * short) % 360
    for value in (-0.3, 0.0, 0.4, 1.0, 1.3):
        h = (minus + value * short) % 360
        assert shapes.progress(h, "colour", minus, plus, via=on_short) == shapes.progress(h, "colour", minus, plus)
    assert shapes.progress(120.0, "size", 100.0, 140.0, via=walk[2]) == 0.5  # `via` is a hue: colour only


def test_a_colour_sweep_the_long_way_round_its_scale_0_hue_reads_as_a_glide():
    """Rendered, read back and scored as `loratool demo` scores a sweep: magenta → red → yellow → green →
    azure, the walk a slider must take from a yellow scale-0 render, glides. Read on the pair's shorter arc
    (through violet), as before, the same renders went 0, −0.6, 2.2, 1.6, 1."""
    from loratool.demo.evaluation import evaluate

    _, _, minus, plus = shapes.concept_pair("colour", 1)
    scales = [-1.0, -0.5, 0.0, 0.5, 1.0]
    short = shapes.hue_difference(minus.hue, plus.hue)
    long_ = short - np.copysign(360.0, short)
    hues = {s: (minus.hue + (s + 1) / 2 * long_) % 360 for s in scales}
    images = {(0, s): shapes.render(replace(minus, hue=hues[s])) for s in scales}
    pair = (shapes.describe(shapes.render(minus)).hue, shapes.describe(shapes.render(plus)).hue)
    summary = evaluate(images, scales, [0], "colour", pair)["summary"]
    assert summary["mean_spearman"] == 1.0 and summary["mean_glide"] < 0.3 and 0.95 < summary["span"] < 1.05


@pytest.mark.parametrize("arc", [-170.0, -147.0, -90.0, 90.0, 147.0, 179.0])
@pytest.mark.parametrize("value", [-0.6, -0.2, 0.0, 0.5, 1.0, 1.2, 1.55])
def test_hue_progress_counts_past_either_end_on_a_wide_arc(arc, value):
    """A hue just past plus is past plus (> 1), not far behind minus: within half a circle of the midpoint."""
    if abs(value - 0.5) * abs(arc) >= 180:
        return  # beyond half a circle from the midpoint the nearer end of the other way is the reading
    for minus in (0.0, 100.0, 280.0):
        assert shapes.progress((minus + value * arc) % 360, "colour", minus, (minus + arc) % 360) == pytest.approx(
            value
        )


def test_captions_use_only_single_token_words():
    from loratool.sdxl.tiny import DEFAULT_WORDS, build_tokenizer

    tokenizer = build_tokenizer()
    scenes = [shapes.scene_for(0, i, backgrounds=tuple(shapes.BACKGROUNDS)) for i in range(300)]
    words = {w for s in scenes for w in s.caption.split()}
    assert words <= set(DEFAULT_WORDS)
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_captions_leave_words_out_at_random_and_never_name_an_unclear_value():
    scenes = [shapes.scene_for(1, i) for i in range(2000)]
    for attribute in shapes.ATTRIBUTES:
        named = np.mean([attribute in s.named_in_caption for s in scenes])
        assert 0.4 < named < 0.9, (attribute, named)
    assert 0.0 < np.mean([s.caption == "" for s in scenes]) < 0.05
    assert np.mean([len(s.named_in_caption) == len(shapes.ATTRIBUTES) for s in scenes]) > 0.1
    for scene in scenes[:300]:  # a named word is what describe() reads back from the drawn image
        seen = shapes.describe(shapes.render(scene))
        for attribute in scene.named_in_caption:
            assert getattr(seen, attribute) == getattr(scene, attribute), (scene, attribute)


def test_a_decoy_redraws_what_the_caption_names_and_keeps_what_it_leaves_out():
    fields = {"shape": "shape", "colour": "hue", "size": "radius", "position": "cx"}
    moved = {a: [] for a in fields}
    for i in range(400):
        scene = shapes.scene_for(3, i)
        decoy = shapes.decoy(scene, np.random.default_rng((3, i, 1)))
        assert (decoy.cy, decoy.background, decoy.named) == (scene.cy, scene.background, scene.named)
        for attribute, field in fields.items():
            if attribute in scene.named_in_caption:
                moved[attribute].append(getattr(decoy, field) != getattr(scene, field))
            else:  # the seed's share of the scene: the remnant must stay true to it
                assert getattr(decoy, field) == getattr(scene, field), (scene, attribute)
        r = decoy.radius
        assert shapes.RADIUS[0] <= r <= shapes.RADIUS[1]
        assert r + shapes.MARGIN - 1e-9 <= decoy.cx <= shapes.SIZE - r - shapes.MARGIN + 1e-9  # inside the frame
    for attribute, flags in moved.items():  # drawn afresh: the shape kind keeps its old one by chance, 1 in 3
        assert np.mean(flags) > (0.5 if attribute == "shape" else 0.97), attribute
    decoys, scenes = shapes.render_many(6, seed=3, start=10, decoys=True)
    again = shapes.render_many(2, seed=3, start=14, decoys=True)[0]  # chunks drawn apart equal the whole
    assert np.array_equal(decoys[4:], again)
    assert scenes == [shapes.decoy(shapes.scene_for(3, i), np.random.default_rng((3, i, 1))) for i in range(10, 16)]


def test_attributes_are_continuous():
    scenes = [shapes.scene_for(2, i, drop_words=False) for i in range(500)]
    for field, low, high in (("radius", 10, 34), ("cx", 24, 104), ("hue", 0, 360)):
        values = np.array([getattr(s, field) for s in scenes])
        assert values.min() < low + 3 and values.max() > high - 3, field
        assert len(np.unique(values.round(1))) > 100, field  # not a handful of modes


@pytest.mark.parametrize("concept", shapes.CONCEPTS)
def test_the_sweep_context_is_the_pairs_shared_caption_without_the_concept(concept):
    for seed in range(6):
        _, _, minus, plus = shapes.concept_pair(concept, seed)
        context = minus.caption_without(concept)
        assert context == plus.caption_without(concept)
        concept_words = {"size": {"small", "large"}, "colour": set(shapes.COLOURS),
                         "position": {"left", "right", "center"}}[concept]  # fmt: skip
        assert not concept_words & set(context.split())
        assert context.split()[0] == "a" and minus.shape in context.split()


def test_every_tiny_word_is_one_token():
    """Regression: words sharing pieces with earlier ones ("green" after "red") used to split into 4 tokens."""
    from loratool.sdxl.tiny import DEFAULT_WORDS, build_tokenizer

    tokenizer = build_tokenizer()
    assert [w for w in DEFAULT_WORDS if len(tokenizer(w, add_special_tokens=False).input_ids) != 1] == []
    ids = tokenizer(" ".join(DEFAULT_WORDS), add_special_tokens=False).input_ids
    assert len(ids) == len(DEFAULT_WORDS) == len(set(ids))


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

    def run(out, **options):
        cfg = BuildConfig(out=out, device="cpu", steps=(3, 3, 3), images=16, size=64, vae_batch=2, unet_batch=4)
        cfg = replace(cfg, spec=TinySpec(), **options)
        return build(cfg)

    report = run(tmp_path / "a")
    run(tmp_path / "b")
    assert run(tmp_path / "decoy", decoy=1.0)["config"]["decoy"] == 1.0  # the base's first steps only
    for folder, same in (("base/unet", False), ("refiner/unet", True), ("base/vae", True)):
        a, b = (load_file(tmp_path / d / folder / "diffusion_pytorch_model.safetensors") for d in ("a", "decoy"))
        assert all(torch.equal(a[k], b[k]) for k in a) == same, folder
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 7  # base: te1, te2, unet, vae; refiner: te2, unet, vae
    for f in files:
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
        assert all(t.dtype == torch.float16 for t in a.values()), f
    assert report["base_steps"] == report["refiner_steps"] == 3 and np.isfinite(report["vae_psnr_db"])


def test_the_build_takes_a_decoy_share_and_refuses_it_beside_pure_noise(capsys):
    from loratool.demo.build import parse_args

    assert parse_args(["--out", "m", "--decoy", "0.25"]).decoy == 0.25
    for bad in (["--decoy", "1.5"], ["--decoy", "0.25", "--pure-noise", "0.25"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--out", "m", *bad])
        assert exit_.value.code == 2 and "--decoy" in capsys.readouterr().err


def test_a_decoder_fine_tune_keeps_the_encoder_and_the_unets(tmp_path, recwarn):
    """`--vae-part decoder` changes what is drawn, never the latents: the UNets' training data stays valid."""
    from safetensors.torch import load_file

    from loratool.demo.build import BuildConfig, build
    from loratool.sdxl.tiny import TinySpec

    first = BuildConfig(out=tmp_path / "a", device="cpu", steps=(2, 2, 2), images=16, size=64, vae_batch=2)
    first.unet_batch, first.spec = 4, TinySpec()
    build(first)
    tuned = replace(first, out=tmp_path / "b", steps=(3, 0, 0), start_from=str(tmp_path / "a"))
    tuned.vae_part, tuned.vae_lr = "decoder", 1e-2
    report = build(tuned)
    assert report["vae_steps"] == 3 and "latent_mean" not in report  # the kept encoder is not re-scaled
    for part in ("base/unet", "refiner/unet"):
        a, b = (load_file(tmp_path / x / part / "diffusion_pytorch_model.safetensors") for x in "ab")
        assert all(torch.equal(a[k], b[k]) for k in a), part
    a, b = (load_file(tmp_path / x / "base/vae/diffusion_pytorch_model.safetensors") for x in "ab")
    kept = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert kept and all(torch.equal(a[k], b[k]) for k in kept)
    assert any(not torch.equal(a[k], b[k]) for k in trained)
    # a UNet fine-tune keeps the VAE byte for byte (it once re-scaled the latents to its own scenes' spread)
    unet_only = replace(tuned, out=tmp_path / "c", steps=(0, 1, 0), start_from=str(tmp_path / "b"), seed=1)
    assert "latent_mean" not in build(unet_only)
    b, c = (load_file(tmp_path / x / "base/vae/diffusion_pytorch_model.safetensors") for x in "bc")
    assert all(torch.equal(b[k], c[k]) for k in b)
    # a fine-tune loads its start through the verbs' loader: no deprecated-argument warning on stderr
    assert not [w for w in recwarn if "torch_dtype" in str(w.message)]


def test_a_zero_snr_build_saves_its_schedule_and_sample_follows_it(tmp_path):
    """`--zero-snr` is a property of the saved model, not of the build: both folders' scheduler configs carry it,
    and `loratool sample` starts from t = 999 on that schedule and renders (velocity, no NaN at SNR 0)."""
    from diffusers import EulerDiscreteScheduler

    from loratool import sample
    from loratool.demo.build import BuildConfig, build
    from loratool.sdxl.tiny import TinySpec

    cfg = BuildConfig(out=tmp_path / "z", device="cpu", steps=(1, 2, 2), images=16, size=64, vae_batch=2)
    cfg.unet_batch, cfg.spec, cfg.zero_snr = 4, TinySpec(), True
    report = build(cfg)
    assert np.isfinite(report["base_loss"]) and np.isfinite(report["refiner_loss"])
    for part in ("base", "refiner"):
        sched = EulerDiscreteScheduler.from_pretrained(cfg.out / part, subfolder="scheduler")
        assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr
        sched.set_timesteps(4)
        assert int(sched.timesteps[0]) == 999
    out = tmp_path / "renders"
    config = sample.SampleConfig(output=out, model=str(cfg.out / "base"), refiner=str(cfg.out / "refiner"))
    config.steps, config.seeds, config.scales = 4, [0], [0.0]
    sample.run(config)
    pixels = np.asarray(Image.open(next(out.rglob("*.png"))).convert("RGB"))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0


def test_a_stage_of_zero_steps_is_skipped_and_others_end_on_their_count():
    """`--steps 0,N,M` fine-tunes the UNets and keeps the VAE: its stage runs no step (it once ran one)."""
    from loratool.demo.schedule import Budget

    assert Budget(steps=0).done(0)
    assert not Budget(steps=3).done(2) and Budget(steps=3).done(3)
    assert 0.0 < Budget(steps=10, warmup=1).lr_factor(9) < Budget(steps=10, warmup=1).lr_factor(1) <= 1.0


def test_the_quality_check_writes_its_report_and_its_own_lines_only(tmp_path):
    """`python -m loratool.demo.quality` logs at INFO for its own lines; with the root logger at INFO, other
    libraries' chatter (diffusers loading bitsandbytes and its CPU-kernel warning) once came through too."""
    sheet = tmp_path / "sheet.png"
    args = ["--model", "demo", "--prompts", "1", "--seeds", "1", "--steps", "2", "--sheet", str(sheet)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "loratool.demo.quality", *args], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["renders"] > 0 and sheet.exists()
    assert result.stderr.splitlines() == [f"contact sheet: {sheet}"], result.stderr[-2000:]
