"""The training objective: pure-noise samples aim the sampler's first x0 estimate at the image."""

import pytest
import torch
from diffusers import DDPMScheduler

from loratool.train.loss import from_pure_noise, sample_losses


def _sched(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


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
