"""The demo build's denoising batches: the usual ones bit for bit; pure-noise and offset-noise samples on request."""

import pytest
import torch
from diffusers import DDPMScheduler

from loratool.demo.denoiser import DenoiserData, DenoiserRun, noisy_batch
from loratool.sdxl.tiny import scheduler
from loratool.train.loss import PURE_NOISE_FROM

SCHED = DDPMScheduler.from_config(scheduler().config)


def _data(seed: int, n: int = 16) -> DenoiserData:
    gen = torch.Generator().manual_seed(seed)
    return DenoiserData(torch.randn(n, 4, 16, 16, generator=gen), torch.arange(n), conditioning=None)


def _batch(data: DenoiserData, run: DenoiserRun, seed: int = 5):
    return noisy_batch(data, run, SCHED, torch.Generator().manual_seed(seed))


def test_without_the_options_a_batch_is_the_one_earlier_builds_trained_on():
    """Documented build commands must rebuild the same model: same random stream, same arithmetic."""
    data, run = _data(0), DenoiserRun(batch=64, lr=1e-4)
    xt, t, target, weight, caption, dropped = _batch(data, run)

    gen = torch.Generator().manual_seed(5)  # the stream as builds before the options drew it
    idx = torch.randint(len(data.latents), (64,), generator=gen)
    t_old = torch.randint(0, 1000, (64,), generator=gen)
    noise = torch.randn((64, 4, 16, 16), generator=gen)
    dropped_old = torch.rand(64, generator=gen) < run.caption_dropout
    a = scheduler().alphas_cumprod[t_old].view(-1, 1, 1, 1)
    assert torch.equal(xt, a.sqrt() * data.latents[idx] + (1 - a).sqrt() * noise)
    assert torch.equal(t, t_old) and torch.equal(target, noise) and torch.equal(dropped, dropped_old)
    assert torch.equal(caption, idx)
    assert torch.equal(weight, ((a / (1 - a)).clamp(max=5.0) / (a / (1 - a))).flatten())


@pytest.mark.parametrize("max_timestep", [1000, 200])
def test_pure_noise_samples_hold_nothing_of_the_image_and_only_the_base_gets_them(max_timestep):
    """Two data sets, same random stream: a pure-noise sample's input is the same whatever the image, an ordinary
    one's is not. Either way the target turns the input back into the image (the x0 estimate is exact)."""
    run = DenoiserRun(batch=256, lr=1e-4, max_timestep=max_timestep, pure_noise=0.5)
    first, second = _data(0), _data(1)
    xt, t, target, *_ = _batch(first, run)
    xt2, *_ = _batch(second, run)
    pure = (xt == xt2).flatten(1).all(dim=1)
    if max_timestep <= PURE_NOISE_FROM:  # the refiner's low-noise end: the sampler never starts there
        assert not pure.any()
        return
    assert 0.4 < pure.float().mean() < 0.6
    assert (t[pure] >= PURE_NOISE_FROM).all()
    assert abs(xt[pure].std().item() - 1.0) < 0.02  # unit noise, as the sampler's first step sees it
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(len(first.latents), (256,), generator=gen)
    a = SCHED.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (xt - (1 - a).sqrt() * target) / a.sqrt()
    assert torch.allclose(x0, first.latents[idx], atol=2e-3)


def test_offset_noise_shifts_each_samples_channel_means():
    data = _data(0)
    means = {}
    for offset in (0.0, 0.5):
        _, _, target, *_ = _batch(data, DenoiserRun(batch=256, lr=1e-4, noise_offset=offset))
        means[offset] = target.mean(dim=(2, 3)).std().item()
    assert means[0.0] < 0.1  # 1/16 for unit noise on 16 × 16
    assert 0.4 < means[0.5] < 0.6
