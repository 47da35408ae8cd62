"""The training objective: pure-noise samples aim the sampler's first x0 estimate at the image."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from loratool.train.loss import draw_noise, from_pure_noise, min_snr_weight, sample_losses


def _sched(prediction_type="epsilon", zero_snr=False):
    scaled = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    return DDPMScheduler(**scaled, prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)


def _x0_estimate(sched, noisy, target, t):
    ab = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    if sched.config.prediction_type == "epsilon":
        return (noisy - (1 - ab).sqrt() * target) / ab.sqrt()
    return ab.sqrt() * noisy - (1 - ab).sqrt() * target


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pure_noise_samples_see_unit_noise_and_their_target_gives_back_the_image(prediction_type):
    sched = _sched(prediction_type)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([999, 900, 500, 100])
    pure = torch.tensor([True, True, False, False])
    noisy, target_noise = from_pure_noise(sched, latents, noise, t, pure)
    target = target_noise if prediction_type == "epsilon" else sched.get_velocity(latents, target_noise, t)

    assert torch.equal(noisy[:2], noise[:2])  # what the sampler feeds at its first step: the seed's noise
    assert torch.allclose(_x0_estimate(sched, noisy, target, t)[:2], latents[:2], atol=1e-9)
    assert torch.equal(noisy[2:], sched.add_noise(latents, noise, t)[2:])  # ordinary samples untouched
    assert torch.equal(target_noise[2:], noise[2:])


def test_without_pure_noise_the_random_stream_and_loss_are_the_usual_ones(tiny_unet_batch):
    unet, batch = tiny_unet_batch
    sched = _sched()
    runs = [sample_losses(unet, sched, batch, torch.Generator().manual_seed(3), pure_noise=p) for p in (0.0, 0.0)]
    assert torch.equal(*runs)
    mixed = sample_losses(unet, sched, batch, torch.Generator().manual_seed(3), pure_noise=0.99)
    assert not torch.equal(runs[0], mixed)


@pytest.fixture(scope="module")
def tiny_unet_batch(tiny_models):
    from diffusers import UNet2DConditionModel

    from loratool.train.batch import Batch

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "base" / "unet").eval()
    gen = torch.Generator().manual_seed(1)
    dim, pooled_dim = unet.config.cross_attention_dim, unet.add_embedding.linear_1.in_features
    n_ids = 6
    pooled_dim -= n_ids * unet.config.addition_time_embed_dim
    batch = Batch(
        latents=torch.randn(2, 4, 8, 8, generator=gen),
        time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        captions=["", ""],
        prompt_embeds=torch.randn(2, 7, dim, generator=gen),
        pooled=torch.randn(2, pooled_dim, generator=gen),
    )
    return unet, batch


def test_the_text_slider_target_is_linear_in_the_scale_and_the_base_at_zero():
    from loratool.train.loss import guided_target

    gen = torch.Generator().manual_seed(3)
    base, plus, minus = (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    at = {s: guided_target(base, plus, minus, s, 2.5) for s in (-1.0, -0.5, 0.0, 0.5, 1.0)}
    assert torch.equal(at[0.0], base)
    assert torch.allclose(at[1.0] + at[-1.0], 2 * base)  # mirror images around the base
    assert torch.allclose(at[0.5] - at[-0.5], 2.5 * (plus - minus))  # one unit of scale: strength × direction
    assert torch.allclose(at[1.0] - at[0.5], at[0.5] - at[0.0])  # even steps: a glide is what it is asked for
    assert torch.equal(guided_target(base, plus, plus, 1.0, 2.5), base)  # the same prompt twice: nothing to learn


def test_a_text_slider_step_makes_each_frozen_estimate_once_and_reuse_changes_no_bit(tiny_unet_batch):
    """A step's four batches (two context prompts, each at +1 and −1) share noise and timestep: the prompt's
    estimate is made once per context and the guide's pair once per step (2 UNet calls, not 4). The −1 half
    gets exactly what the +1 half's call made, and every target combines the UNet's estimates at its inputs."""
    from loratool.train.batch import Guide
    from loratool.train.loss import guided_target, text_slider_target

    unet, batch = tiny_unet_batch
    gen = torch.Generator().manual_seed(5)
    embeds, pooled = batch.prompt_embeds, batch.pooled
    plus, minus = ((torch.randn(1, *embeds.shape[1:], generator=gen), pooled[:1] + 1) for _ in range(2))
    contexts = [embeds, torch.randn(embeds.shape, generator=gen)]
    noisy, t = torch.randn(batch.latents.shape, generator=gen), torch.tensor([700, 300])
    cond = {"text_embeds": pooled, "time_ids": batch.time_ids}
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    guide = Guide(plus, minus, 2.0)
    try:
        steps = [(e, s) for e in contexts for s in (1.0, -1.0)]
        got = [text_slider_target(unet, noisy, t, e, cond, guide, s) for e, s in steps]
        assert len(calls) == 2  # the first batch's three estimates in one call, the second context's prompt
        text_slider_target(unet, noisy + 1, t, contexts[0], cond, guide, 1.0)  # the next step's noise
        assert len(calls) == 3
    finally:
        hook.remove()
    with torch.no_grad():
        at = {name: unet(noisy, t, encoder_hidden_states=e.expand(2, -1, -1), added_cond_kwargs={
            "text_embeds": p.expand(2, -1), "time_ids": batch.time_ids}).sample for name, (e, p) in (
            ("plus", plus), ("minus", minus))}  # fmt: skip
        assert torch.equal(got[1], text_slider_target(unet, noisy, t, contexts[0], cond, Guide(plus, minus, 2.0), -1))
        for (e, s), target in zip(steps, got, strict=True):
            base = unet(noisy, t, encoder_hidden_states=e, added_cond_kwargs=cond).sample
            assert torch.allclose(target, guided_target(base, at["plus"], at["minus"], s, 2.0), atol=1e-5)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_min_snr_weights_are_min_snr_over_snr_and_finite_at_pure_noise(zero_snr):
    """Min-SNR-γ: ε-prediction weighs min(SNR, γ) / SNR, v-prediction min(SNR, γ) / (SNR + 1). A zero-terminal-SNR
    schedule (SNR exactly 0 at its last step) must not give a NaN loss: ε's weight there is its limit, 1."""
    t = torch.tensor(torch.arange(0, 1000, 37).tolist() + [999])
    ac = _sched(zero_snr=zero_snr).alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    gamma = 5.0
    eps = min_snr_weight(_sched("epsilon", zero_snr), t, gamma).double()
    v = min_snr_weight(_sched("v_prediction", zero_snr), t, gamma).double()

    assert torch.isfinite(eps).all() and torch.isfinite(v).all()
    assert torch.allclose(v, snr.clamp(max=gamma) / (snr + 1), atol=1e-6)
    positive = snr > 0
    assert torch.allclose(eps[positive], snr[positive].clamp(max=gamma) / snr[positive], rtol=1e-5)
    assert (eps <= 1).all() and eps[snr < gamma].eq(1).all()  # noisier than γ: full weight
    assert zero_snr == (snr[-1] == 0)  # the zero-SNR schedule does reach SNR 0 at its last step


def test_multires_noise_is_unit_noise_with_more_coarse_structure_and_off_changes_nothing():
    """--multires-noise: the same unit-variance noise, but its coarse (4×4-pooled) part carries over twice
    the plain noise's power, which is what teaches a copy that a seed's coarse layout is noise. Off (0), the
    random stream is bit for bit what it was."""
    shape = (64, 4, 16, 16)

    def draw(multires, offset=0.2):
        return draw_noise(shape, torch.Generator().manual_seed(7), "cpu", offset, multires)

    plain, coarse = draw(0.0), draw(0.5)
    gen = torch.Generator().manual_seed(7)
    before = torch.randn(shape, generator=gen) + 0.2 * torch.randn((64, 4, 1, 1), generator=gen)
    assert torch.equal(plain, before)
    assert torch.equal(coarse, draw(0.5))  # seeded
    assert abs(coarse.std().item() - 1.0) < 1e-5
    pooled = {name: F.avg_pool2d(x, 4).var().item() for name, x in (("plain", draw(0.0, 0.0)), ("coarse", coarse))}
    assert pooled["coarse"] > 2 * pooled["plain"], pooled  # measured: 0.16 against 0.06
