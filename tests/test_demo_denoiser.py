"""The demo build's denoising batches: the usual ones bit for bit; pure-noise and offset-noise samples on request."""

import pytest
import torch
from diffusers import DDPMScheduler

from loratool.demo.build import zero_snr_scheduler
from loratool.demo.denoiser import DenoiserData, DenoiserRun, noisy_batch
from loratool.sdxl.tiny import scheduler
from loratool.train.loss import PURE_NOISE_FROM

SCHED = DDPMScheduler.from_config(scheduler().config)


def _data(seed: int, n: int = 16) -> DenoiserData:
    gen = torch.Generator().manual_seed(seed)
    return DenoiserData(torch.randn(n, 4, 16, 16, generator=gen), torch.arange(n), conditioning=None)


def _batch(data: DenoiserData, run: DenoiserRun, seed: int = 5, sched=SCHED):
    return noisy_batch(data, run, sched, torch.Generator().manual_seed(seed))


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


def test_decoy_samples_start_from_the_decoy_and_are_asked_for_the_real_image():
    """Base only, t ≥ 850, never on a dropped caption; the input is the decoy noised, the target the noise that
    gives back the real latents, and a latent whose decoy is itself is an ordinary sample."""
    first = _data(0)
    decoys = DenoiserData(first.latents, first.captions, None, decoys=_data(1).latents)
    same = DenoiserData(first.latents, first.captions, None, decoys=first.latents)
    run = DenoiserRun(batch=256, lr=1e-4, decoy=0.5)
    xt, t, target, _, _, dropped = _batch(decoys, run)
    xt_same, t_same, target_same, *_ = _batch(same, run)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(len(first.latents), (256,), generator=gen)
    a = SCHED.alphas_cumprod[t].view(-1, 1, 1, 1)
    from_decoy = torch.isclose(xt, a.sqrt() * decoys.decoys[idx] + (1 - a).sqrt() * target_same, atol=1e-5)
    decoyed = from_decoy.flatten(1).all(dim=1) & ~(xt == xt_same).flatten(1).all(dim=1)
    assert 0.4 < decoyed.float().mean() < 0.55 and not (decoyed & dropped).any()
    assert (t[decoyed] >= PURE_NOISE_FROM).all() and torch.equal(t, t_same)
    x0 = (xt - (1 - a).sqrt() * target) / a.sqrt()
    assert torch.allclose(x0, first.latents[idx], atol=2e-3)
    a_same = SCHED.alphas_cumprod[t_same].view(-1, 1, 1, 1)
    assert torch.allclose(xt_same, a_same.sqrt() * first.latents[idx] + (1 - a_same).sqrt() * target_same, atol=1e-5)
    refiner = _batch(decoys, DenoiserRun(batch=256, lr=1e-4, max_timestep=200, decoy=0.5))
    plain = _batch(decoys, DenoiserRun(batch=256, lr=1e-4, max_timestep=200))
    assert all(torch.equal(x, y) for x, y in zip(refiner, plain, strict=True))


def test_offset_noise_shifts_each_samples_channel_means():
    data = _data(0)
    means = {}
    for offset in (0.0, 0.5):
        _, _, target, *_ = _batch(data, DenoiserRun(batch=256, lr=1e-4, noise_offset=offset))
        means[offset] = target.mean(dim=(2, 3)).std().item()
    assert means[0.0] < 0.1  # 1/16 for unit noise on 16 × 16
    assert 0.4 < means[0.5] < 0.6


def test_on_the_zero_snr_schedule_sampling_starts_from_pure_noise_and_the_target_is_velocity():
    """The last step holds nothing of the image and the sampler starts there; the target is velocity, which
    gives the image back at every step (at the last one it is −x0), and the last steps keep their weight."""
    sampler = zero_snr_scheduler(scheduler())
    sampler.set_timesteps(20)
    assert int(sampler.timesteps[0]) == 999
    sched = DDPMScheduler.from_config(sampler.config)
    assert sched.alphas_cumprod[-1] == 0 and sched.config.prediction_type == "v_prediction"
    first, second = _data(0), _data(1)
    run = DenoiserRun(batch=1024, lr=1e-4)
    xt, t, target, weight, *_ = _batch(first, run, sched=sched)
    xt2, *_ = _batch(second, run, sched=sched)
    last = t == 999
    assert last.any() and torch.equal(xt[last], xt2[last]) and not torch.equal(xt[~last], xt2[~last])
    idx = torch.randint(len(first.latents), (1024,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(target[last], -first.latents[idx][last])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * target, first.latents[idx], atol=1e-4)
    assert torch.isfinite(weight).all() and (weight[t > 500] == 1).all() and (weight[t < 50] < 0.3).all()
