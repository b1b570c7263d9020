"""SFT and DDPO on a tiny Stable-Diffusion-shaped pipeline (real tokenizer, real diffusers classes)."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import TEST_CACHE, make_tiny_sd

from harness.errors import HarnessError
from harness_plugins.sd.config import DDPOConfig, SFTConfig, load_config
from harness_plugins.sd.diffusion import (
    ddim_step_with_logprob,
    encode_prompts,
    load_pipeline,
    ppo_loss,
    sample_with_logprob,
    unet_guided,
)
from harness_plugins.sd.ddpo import DDPOTrainer
from harness_plugins.sd.sft import SFTTrainer

pytestmark = pytest.mark.timeout(900)


def brightness(images, prompts):
    return np.array([np.asarray(im, dtype=np.float64).mean() / 255 for im in images])


def darkness(images, prompts):
    return -brightness(images, prompts)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "eps")


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory):
    """The tiny pipeline with a trained tiny VAE, whose decoder carries brightness from the latents."""
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "trained-vae", trained_vae=True)


@pytest.fixture(scope="module")
def sd_v(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "v", prediction_type="v_prediction")


def config(cls, sd, out, **kw):
    base = dict(base_model=str(sd), prompts=["a red car", "a cat"], num_epochs=2, sample_num_steps=4,
                output_dir=str(out), sample_num_batches_per_epoch=1, sample_batch_size=4,
                train_batch_size=4, mixed_precision="no")
    base.update(kw)
    return load_config(cls, base)


@pytest.fixture(scope="module")
def trl_modules():
    """trl 0.23.1, the DDPO implementation the paper used, from its wheel (no dependencies)."""
    target = TEST_CACHE / "trl-0.23.1"
    if not (target / "trl").is_dir():
        wheels = TEST_CACHE / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        found = list(wheels.glob("trl-0.23.1-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "trl==0.23.1",
                            "-d", str(wheels)], check=True, timeout=300)
            found = list(wheels.glob("trl-0.23.1-*.whl"))
        with zipfile.ZipFile(found[0]) as zf:
            zf.extractall(target)
    sys.path.insert(0, str(target))
    import accelerate

    accelerate.PartialState()  # trl's trainer module needs an accelerate state first
    from trl.models.modeling_sd_base import scheduler_step
    from trl.trainer.ddpo_trainer import DDPOTrainer as TrlDDPOTrainer

    yield scheduler_step, TrlDDPOTrainer
    sys.path.remove(str(target))


@pytest.mark.parametrize("which", ["sd", "sd_v"])
def test_ddim_logprob_and_loss_match_trl(which, request, trl_modules):
    scheduler_step, trl_trainer = trl_modules
    pipe = load_pipeline(str(request.getfixturevalue(which)))
    pos, neg = encode_prompts(pipe, ["a red car", "a cat", "two dogs"])
    out = sample_with_logprob(pipe, pos, neg, num_steps=5, guidance=5.0, eta=1.0,
                              generator=torch.Generator().manual_seed(0))
    lat, ts = out["latents"], out["timesteps"]
    for j in range(5):
        pred = torch.randn(lat[:, j].shape, generator=torch.Generator().manual_seed(j))
        ours = ddim_step_with_logprob(pipe.scheduler, pred, ts[:, j], lat[:, j], 1.0, prev_sample=lat[:, j + 1])
        ref = scheduler_step(pipe.scheduler, pred, ts[:, j], lat[:, j], 1.0, prev_sample=lat[:, j + 1])
        torch.testing.assert_close(ours[1], ref.log_probs, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours[0], ref.latents, atol=1e-5, rtol=0)
    # The sampled chain's own log-probs are what the step returns for it.
    again = ddim_step_with_logprob(pipe.scheduler, torch.zeros_like(lat[:, 0]), ts[:, 0], lat[:, 0], 1.0,
                                   prev_sample=lat[:, 1])
    assert again[1].shape == (3,)
    adv = torch.tensor([1.5, -0.3, 0.7, -2.0])
    ratio = torch.tensor([1.2, 0.7, 1.00005, 0.99])
    for clip in (1e-4, 0.2):
        torch.testing.assert_close(ppo_loss(adv, ratio, clip), trl_trainer.loss(None, adv, clip, ratio),
                                   atol=1e-7, rtol=0)


def _logprob_change(trainer, s):
    """Per-trajectory change of the summed log-probability of an epoch's own samples."""
    with torch.no_grad():
        n, T = s["log_probs"].shape
        new = torch.zeros(n, T)
        for j in range(T):
            pred = unet_guided(trainer.pipe, s["latents"][:, j], s["timesteps"][:, j], s["pos"], s["neg"],
                               trainer.config.sample_guidance_scale)
            _, lp = ddim_step_with_logprob(trainer.pipe.scheduler, pred, s["timesteps"][:, j],
                                           s["latents"][:, j], 1.0, prev_sample=s["latents"][:, j + 1])
            new[:, j] = lp
    return (new - s["log_probs"]).sum(1).numpy()


def test_ddpo_update_follows_the_planted_reward(sd, tmp_path):
    """Image brightness as the reward, and its negation: on the same sampled trajectories, one DDPO
    epoch raises the likelihood of the brighter ones in the first run and of the darker ones in the
    second (policy improvement on the sampled batch, the quantity PPO optimises)."""
    changes, advantages = {}, {}
    for name, reward in (("bright", brightness), ("dark", darkness)):
        cfg = config(DDPOConfig, sd, tmp_path / name, num_epochs=1, sample_num_batches_per_epoch=2,
                     sample_batch_size=8, train_batch_size=8, train_learning_rate=1e-2,
                     train_clip_range=0.5, per_prompt_stat_tracking=False)
        trainer = DDPOTrainer(cfg, reward=reward)
        captured = {}
        sample = trainer.sample
        trainer.sample = lambda e, _s=sample, _c=captured: _c.update(_s(e)) or _c
        log = trainer.train()["log"]
        r = captured["rewards"]
        advantages[name] = (r - r.mean()) / (r.std() + 1e-8)
        changes[name] = _logprob_change(trainer, captured)
        assert log[0]["approx_kl"] >= 0
    for name in ("bright", "dark"):
        assert float(advantages[name] @ changes[name]) > 0
        assert np.corrcoef(advantages[name], changes[name])[0, 1] > 0.3
    # Same trajectories, opposite rewards: opposite updates.
    np.testing.assert_allclose(advantages["bright"], -advantages["dark"], atol=1e-9)
    assert np.corrcoef(changes["bright"], changes["dark"])[0, 1] < -0.3


def test_ddpo_raises_the_planted_reward_on_fresh_samples(sd_vae, tmp_path):
    """With image brightness as the reward, DDPO makes the model's images brighter over a few
    iterations; with its negation, darker. Judged by the overoptimization monitor on 16 fixed
    evaluation seeds that training never draws: the base model (epoch 0) against the last epoch,
    image by image. 8 denoising steps, not 4: the last two DDIM steps have a noise std 20-40x
    smaller than the first ones, so their score terms (noise / std) dominate the policy gradient
    while barely moving the image; with 4 steps that is half the chain and some seeds learn the
    wrong way. With 8 steps, 30 of 30 runs (4 tiny pipelines x training seeds 0-3) moved the
    rewarded way, paired t >= 6.7."""
    epochs = 16
    shift = {}
    for name, reward, other in (("bright", brightness, darkness), ("dark", darkness, brightness)):
        out = tmp_path / name
        # 32 samples and one optimizer step per epoch (4 batches of 8, accumulated)
        cfg = config(DDPOConfig, sd_vae, out, prompts=["a red car"], num_epochs=epochs, resolution=8,
                     sample_num_steps=8, sample_num_batches_per_epoch=4, sample_batch_size=8,
                     train_batch_size=8, train_gradient_accumulation_steps=4, train_learning_rate=1e-2,
                     train_clip_range=0.2,
                     per_prompt_stat_tracking=False, save_freq=epochs, eval_freq=epochs,
                     eval_prompts=["a red car"], eval_images_per_prompt=16)
        log = DDPOTrainer(cfg, reward=reward, heldout={other.__name__: other}).train()["log"]
        assert len(log) == epochs
        monitor = pd.read_csv(out / "monitor.csv")
        b = monitor[monitor.reward == "brightness"].pivot(index="seed_index", columns="epoch", values="score")
        assert list(b.columns) == [0, epochs] and len(b) == 16
        shift[name] = (b[epochs] - b[0]).to_numpy()
        # The selection rule keeps the trained checkpoint: its images beat the base model's.
        selected = json.loads((out / "selected_checkpoint.json").read_text())
        assert selected["epoch"] == epochs and selected["reward"] == reward.__name__
    for name, sign in (("bright", 1), ("dark", -1)):
        d = sign * shift[name]
        t = d.mean() / d.std(ddof=1) * len(d) ** 0.5
        assert t > 3, (name, shift[name])
        assert (d > 0).sum() >= 13, (name, shift[name])


@pytest.mark.parametrize("cls,cfg_cls", [(DDPOTrainer, DDPOConfig), (SFTTrainer, SFTConfig)])
def test_two_iterations_checkpoints_and_exact_resume(cls, cfg_cls, sd, tmp_path):
    extra = {"images_per_prompt": 4, "train_steps_per_round": 2} if cfg_cls is SFTConfig else {}
    straight = cls(config(cfg_cls, sd, tmp_path / "straight", **extra), reward=brightness).train()
    assert [h["epoch"] for h in straight["log"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in straight["log"])
    ckpts = sorted((tmp_path / "straight" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["epoch-0001", "epoch-0002"]
    assert (ckpts[0] / "pytorch_lora_weights.safetensors").is_file()
    # Stop after epoch 1 ("killed"), then resume to epoch 2.
    cls(config(cfg_cls, sd, tmp_path / "resumed", num_epochs=1, **extra), reward=brightness).train()
    resumed = cls(config(cfg_cls, sd, tmp_path / "resumed", resume_from="latest", **extra),
                  reward=brightness).train()
    a = [{k: v for k, v in h.items() if k != "seconds"} for h in straight["log"]]
    b = [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["log"]]
    assert a == b
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "straight/checkpoints/epoch-0002/pytorch_lora_weights.safetensors")
    wb = load_file(tmp_path / "resumed/checkpoints/epoch-0002/pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_weights_save_and_load(sd, tmp_path):
    from harness_plugins.sd.diffusion import add_lora, load_lora

    trainer = DDPOTrainer(config(DDPOConfig, sd, tmp_path / "run", num_epochs=1, train_learning_rate=1e-2),
                          reward=brightness)
    trainer.train()
    pos, neg = encode_prompts(trainer.pipe, ["a red car"])
    kw = dict(num_steps=4, guidance=5.0, eta=1.0)
    trained = sample_with_logprob(trainer.pipe, pos, neg, generator=torch.Generator().manual_seed(3), **kw)
    fresh = load_pipeline(str(sd))
    base = sample_with_logprob(fresh, pos, neg, generator=torch.Generator().manual_seed(3), **kw)
    add_lora(fresh.unet, 4, 4.0)
    load_lora(fresh.unet, tmp_path / "run/checkpoints/epoch-0001")
    loaded = sample_with_logprob(fresh, pos, neg, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(loaded["images"], trained["images"], atol=1e-6, rtol=0)
    assert not torch.allclose(base["images"], trained["images"], atol=1e-6)


def test_sft_v_prediction_and_monitor_selection(sd_v, tmp_path):
    cfg = config(SFTConfig, sd_v, tmp_path / "sft", images_per_prompt=5, keep_fraction=0.2,
                 train_steps_per_round=2, eval_prompts=["a dog"], eval_images_per_prompt=3)
    result = SFTTrainer(cfg, reward=brightness, heldout={"darkness": darkness}).train()
    assert result["log"][0]["prediction_type"] == "v_prediction"
    assert result["log"][0]["kept"] == 2  # top 20% of 10 images
    monitor = pd.read_csv(tmp_path / "sft" / "monitor.csv")
    assert set(monitor["epoch"]) == {0, 1, 2} and set(monitor["reward"]) == {"brightness", "darkness"}
    assert (tmp_path / "sft" / "monitor.png").read_bytes()[:4] == b"\x89PNG"
    selected = json.loads((tmp_path / "sft" / "selected_checkpoint.json").read_text())
    # The rule, recomputed: the earliest epoch whose images beat the base model's most often.
    b = monitor[monitor.reward == "brightness"].pivot(index=["prompt", "seed_index"], columns="epoch", values="score")
    wins = {e: int((b[e] > b[0]).sum()) for e in (1, 2)}
    assert selected["wins"] == {str(k): v for k, v in wins.items()} or selected["wins"] == wins
    assert selected["epoch"] == min(e for e, w in wins.items() if w == max(wins.values()))


def test_nan_reward_stops_with_step_and_prompt_and_keeps_the_checkpoint(sd, tmp_path):
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        out = brightness(images, prompts)
        if calls["n"] == 2:
            out[1] = np.nan
        return out

    cfg = config(DDPOConfig, sd, tmp_path / "nan", num_epochs=3)
    with pytest.raises(HarnessError, match=r"returned nan at epoch 2 .*for prompt '.*'; stopped. Last checkpoint: .*epoch-0001"):
        DDPOTrainer(cfg, reward=flaky).train()
    assert (tmp_path / "nan/checkpoints/epoch-0001/pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "nan/checkpoints/epoch-0002").exists()


def test_config_is_checked_before_any_work(sd, tmp_path):
    with pytest.raises(HarnessError, match="unknown config key 'sample_num_step'. Did you mean 'sample_num_steps'"):
        load_config(DDPOConfig, {"prompts": ["a"], "sample_num_step": 3})
    with pytest.raises(HarnessError, match="'train_timestep_fraction' must be in"):
        load_config(DDPOConfig, {"prompts": ["a"], "train_timestep_fraction": 1.5})
    with pytest.raises(HarnessError, match="'keep_fraction' must be in"):
        load_config(SFTConfig, {"prompts": ["a"], "keep_fraction": 0})
    with pytest.raises(HarnessError, match="needs training 'prompts'"):
        load_config(DDPOConfig, {})
    run = tmp_path / "run.yaml"
    run.write_text(f"base_model: {sd}\nprompts: [a red car]\nnum_epochs: 1\nsample_num_steps: 3\n"
                   f"output_dir: {tmp_path / 'out'}\nsample_batch_size: 2\nmixed_precision: 'no'\n"
                   "train_batch_size: 2\nlearning_rate: 0.1\n")
    result = subprocess.run([sys.executable, "-m", "harness.cli", "finetune", "ddpo", "--config", str(run)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown config key 'learning_rate'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_finetune_with_a_reward_model(sd, tmp_path):
    from tiny_models import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    run = tmp_path / "run.yaml"
    run.write_text(
        f"base_model: {sd}\nprompts: [a realistic photo of two cats]\nnum_epochs: 2\n"
        f"sample_num_steps: 3\noutput_dir: {tmp_path / 'out'}\nsample_batch_size: 2\n"
        f"train_batch_size: 2\nmixed_precision: 'no'\nreward: 'clip:checkpoint={clip}'\n"
        "normalizer: textnorm\nnormalizer_scale: 10\ncontrastive_prompts: rules\n"
        f"eval_prompts: [a realistic photo of a dog]\neval_images_per_prompt: 2\n"
        f"heldout_rewards: ['clip:checkpoint={clip}']\n")
    result = subprocess.run([sys.executable, "-m", "harness.cli", "finetune", "ddpo", "--config", str(run)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Selected checkpoint: epoch" in result.stderr
    log = pd.read_csv(tmp_path / "out" / "train_log.csv")
    assert list(log["epoch"]) == [1, 2]
    # TextNorm confidences are probabilities.
    assert ((log["reward_mean"] > 0) & (log["reward_mean"] <= 1)).all()
    monitor = pd.read_csv(tmp_path / "out" / "monitor.csv")
    assert set(monitor["reward"]) == {f"textnorm(clip:checkpoint={clip})", f"clip:checkpoint={clip}"}
