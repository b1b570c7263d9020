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

from harness.config import load_config
from harness.errors import HarnessError
from harness_plugins.sd.config import DDPOConfig, SFTConfig
from harness_plugins.sd.ddpo import DDPOTrainer
from harness_plugins.sd.diffusion import (
    ddim_step_with_logprob,
    encode_prompts,
    load_pipeline,
    ppo_loss,
    sample_with_logprob,
    unet_guided,
)
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    with pytest.raises(HarnessError, match=r"^stopped at epoch 2, step 2: reward 'flaky' returned nan for "
                       r"prompt '.*' \(1 of 4 images non-finite\); .* the last good checkpoint is "
                       r".*epoch-0001\. Fix the reward"):
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
    from click.testing import CliRunner
    from tiny_models import make_tiny_clip

    from harness.cli import cli

    clip = make_tiny_clip(tmp_path / "clip")
    run = tmp_path / "run.yaml"
    run.write_text(
        f"base_model: {sd}\nprompts: [a realistic photo of two cats]\nnum_epochs: 2\n"
        f"sample_num_steps: 3\noutput_dir: {tmp_path / 'out'}\nsample_batch_size: 2\n"
        f"train_batch_size: 2\nmixed_precision: 'no'\nreward: 'clip:checkpoint={clip}'\n"
        "normalizer: textnorm\nnormalizer_scale: 10\ncontrastive_prompts: rules\n"
        f"eval_prompts: [a realistic photo of a dog]\neval_images_per_prompt: 2\n"
        f"heldout_rewards: ['clip:checkpoint={clip}']\n")
    result = CliRunner().invoke(cli, ["finetune", "ddpo", "--config", str(run)])
    assert result.exit_code == 0, result.output[-3000:]
    assert "Selected checkpoint: epoch" in result.stderr
    log = pd.read_csv(tmp_path / "out" / "train_log.csv")
    assert list(log["epoch"]) == [1, 2]
    assert f"Trained 2 epochs; last mean reward {log['reward_mean'].iloc[-1]:.4f}" in result.stderr
    # TextNorm confidences are probabilities.
    assert ((log["reward_mean"] > 0) & (log["reward_mean"] <= 1)).all()
    monitor = pd.read_csv(tmp_path / "out" / "monitor.csv")
    assert set(monitor["reward"]) == {f"textnorm(clip:checkpoint={clip})", f"clip:checkpoint={clip}"}


# -- the FineTuner contract, through the CLI --------------------------------------------------------
GREY_PLUGIN = '''
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.types import FineTuner, FineTuneResult, FineTuneSettings


@dataclass
class GreyConfig(FineTuneSettings):
    epochs: int = 2
    size: int = 32
    step: float = 64.0

    def validate(self):
        super().validate()
        if self.epochs < 1:
            raise HarnessError(f"config 'epochs' must be >= 1, got {self.epochs}")


class GreyTuner(FineTuner):
    """Learns one grey level: each epoch scores level - step, level, level + step and keeps the
    best by mean reward, then halves the step."""

    id = "grey"
    config_class = GreyConfig

    def train(self, config, reward, *, progress=False, on_checkpoint=None):
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        prompts = config.training_prompts()
        level, step, log, checkpoints = 128.0, config.step, [], []
        for epoch in range(1, config.epochs + 1):
            levels = [max(0.0, level - step), level, min(255.0, level + step)]
            images = [Image.new("RGB", (config.size, config.size), (int(v),) * 3)
                      for v in levels for _ in prompts]
            batch_prompts = [p for _ in levels for p in prompts]
            r = np.asarray(reward(images, batch_prompts), dtype=np.float64)
            level = levels[int(np.argmax(r.reshape(len(levels), len(prompts)).mean(axis=1)))]
            step /= 2
            folder = out / f"epoch-{epoch}"
            folder.mkdir(exist_ok=True)
            (folder / "level.json").write_text(json.dumps({"level": level}))
            record = {"epoch": epoch, "reward_mean": float(r.mean()), "level": level,
                      "levels": levels, "rewards": r.tolist()}
            log.append(record)
            checkpoints.append(str(folder))
            if on_checkpoint is not None:
                on_checkpoint(folder, record)
        (out / "log.json").write_text(json.dumps(log))
        return FineTuneResult(output_dir=str(out), checkpoints=checkpoints, log=log)


@hookimpl
def register_finetuners(register):
    register(GreyTuner)
'''


def _install(site, dist, module, source):
    """A minimal installed distribution on ``site`` with a t2i_harness entry point."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[t2i_harness]\n{module} = {module}\n")


def _textnorm(raw, scale):
    """TextNorm computed here from its definition: softmax probability of column 0."""
    z = scale * np.asarray(raw, dtype=np.float64)
    return float(np.exp(z[0]) / np.exp(z).sum())


def _raw_scores(checkpoint, images, columns):
    """Each image scored alone against its prompt list by the tiny CLIP."""
    from harness.scoring.specs import load_reward_model

    model = load_reward_model(f"clip:checkpoint={checkpoint}", device="cpu")
    out = []
    with torch.no_grad():
        for image, cols in zip(images, columns, strict=True):
            features = model.embed_images(model.preprocess(image)[None])
            out.append(np.asarray(model.score(features, [cols])[0], dtype=np.float64))
    return out


def _images(n, seed=0, size=24):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from tiny_models import make_tiny_clip

    root = tmp_path_factory.mktemp("clips")
    return make_tiny_clip(root / "a", seed=0), make_tiny_clip(root / "b", seed=1)


SETS = {"a red car": ["a blue car", "a red bus"], "two cats": ["three cats", "two dogs"]}


def test_third_party_finetuner_runs_through_the_cli(clips, tmp_path, monkeypatch):
    """A FineTuner from an installed plugin distribution, run by `harness finetune <its id>`
    against a real tiny reward model calibrated by TextNorm: the rewards it logged are what
    TextNorm of the tiny CLIP gives, computed here image by image."""
    from click.testing import CliRunner

    from harness.cli import cli

    site = tmp_path / "site"
    site.mkdir()
    _install(site, "t2i-harness-grey", "t2i_harness_grey", GREY_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "t2i-harness-grey")
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps(SETS))
    run = tmp_path / "run.yaml"
    run.write_text(f"prompts: [a red car, two cats]\nreward: 'clip:checkpoint={clips[0]}'\n"
                   f"normalizer: textnorm\nnormalizer_options: {{scale: 20}}\n"
                   f"contrastive_prompts: {sets}\noutput_dir: {tmp_path / 'out'}\n")
    result = CliRunner().invoke(cli, ["finetune", "grey", "--config", str(run), "--set", "epochs=3"])
    assert result.exit_code == 0, result.output
    log = json.loads((tmp_path / "out" / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert (f"Trained 3 epochs; last mean reward {log[-1]['reward_mean']:.4f}; 3 checkpoints, "
            f"the last {tmp_path / 'out' / 'epoch-3'}") in result.stderr
    from PIL import Image

    prompts = ["a red car", "two cats"]
    for record in log:
        images = [Image.new("RGB", (32, 32), (int(v),) * 3) for v in record["levels"] for _ in prompts]
        batch = [p for _ in record["levels"] for p in prompts]
        raw = _raw_scores(clips[0], images, [[p, *SETS[p]] for p in batch])
        expected = [_textnorm(r, 20.0) for r in raw]
        np.testing.assert_allclose(record["rewards"], expected, rtol=0, atol=1e-6)
    # The rewards are not constant: the tuner had something to choose from.
    assert np.ptp(log[0]["rewards"]) > 1e-3
    # An unknown id is a one-line error with a suggestion.
    result = CliRunner().invoke(cli, ["finetune", "gray", "--config", str(run)])
    assert result.exit_code == 2
    assert "Unknown fine-tuner 'gray'. Did you mean 'grey'?" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ensemble_reward_is_the_mean_of_textnorms_computed_independently(clips):
    from harness.finetune.reward import RewardFunction

    a, b = clips
    prompts = ["a red car", "two cats", "a red car", "a red car", "two cats"]  # interleaved
    images = _images(len(prompts))
    columns = [[p, *SETS[p]] for p in prompts]
    tn = {name: np.array([_textnorm(r, 5.0) for r in _raw_scores(ckpt, images, columns)])
          for name, ckpt in (("a", a), ("b", b))}
    specs = [f"clip:checkpoint={a},label=a", f"clip:checkpoint={b},label=b"]
    mean = RewardFunction(specs, normalizer="mean", normalizer_options={"scale": 5}, contrastive=SETS,
                          device="cpu")(images, prompts)
    np.testing.assert_allclose(mean, (tn["a"] + tn["b"]) / 2, rtol=0, atol=1e-6)
    for name in ("a", "b"):
        single = RewardFunction(specs[0 if name == "a" else 1], normalizer="textnorm",
                                normalizer_options={"scale": 5}, contrastive=SETS, device="cpu")
        np.testing.assert_allclose(single(images, prompts), tn[name], rtol=0, atol=1e-6)
        assert np.abs(mean - tn[name]).max() > 1e-3  # the ensemble is neither model alone
    raw = RewardFunction(f"clip:checkpoint={a}", device="cpu")(images, prompts)
    own = [r[0] for r in _raw_scores(a, images, [[p] for p in prompts])]
    np.testing.assert_allclose(raw, own, rtol=0, atol=1e-6)


def test_reward_calls_the_normalizer_once_per_prompt_with_its_images(clips):
    """A third-party normalizer that only implements __call__: it receives the images of one
    prompt together, and its outputs go back to the images' places in the batch."""
    from harness.finetune.reward import RewardFunction
    from harness.plugins import Entry, get_plugins
    from harness.types import Normalizer

    calls = []

    class Centered(Normalizer):
        id = "centered"

        def __call__(self, scores):
            (own,) = [np.asarray(v)[:, 0] for v in scores.values()]
            calls.append((sorted(scores), len(own)))
            return own - own.mean()

    get_plugins().normalizers.add(Entry(id="centered", cls=Centered, plugin="test"))
    prompts = ["two cats", "a red car", "two cats", "a red car", "a red car"]
    images = _images(len(prompts), seed=3)
    got = RewardFunction(f"clip:checkpoint={clips[0]},label=m", normalizer="centered",
                         contrastive=SETS, device="cpu")(images, prompts)
    own = np.array([r[0] for r in _raw_scores(clips[0], images, [[p] for p in prompts])])
    expected = np.empty(len(prompts))
    for p in set(prompts):
        index = [i for i, q in enumerate(prompts) if q == p]
        expected[index] = own[index] - own[index].mean()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert sorted(calls) == [(["m"], 2), (["m"], 3)]


@pytest.mark.parametrize("extra,message", [
    ("normalizer: zscore\n", "normalizer 'zscore' needs 2 or more images of a prompt"),
    ("normalizer: mean\n", "normalizer 'mean' combines at least 2 reward models, but config 'reward' gives 1"),
    ("normalizer: ur\n", "normalizer 'ur' combines at least 2 reward models, but config 'reward' gives 1"),
    ("normalizer: textnrom\n", "Unknown normalizer 'textnrom'. Did you mean 'textnorm'?"),
    ("normalizer: textnorm\nnormalizer_options: {scael: 3}\n", "normalizer 'textnorm' has no hyperparameter 'scael'"),
    ("normalizer: identity\nnormalizer_scale: 10\n", "normalizer 'identity' has no 'scale' hyperparameter"),
    ("reward: [pickscore, clip]\n", "config 'reward' lists 2 reward models but no 'normalizer'"),
    ("contrastive_prompts: nope\nnormalizer: textnorm\n", "Unknown prompt generator 'nope'"),
])
def test_meaningless_rewards_are_refused_before_training(extra, message, tmp_path):
    """Before any model loads or any folder is written: exit 2 and one line."""
    from click.testing import CliRunner

    from harness.cli import cli

    run = tmp_path / "run.yaml"
    run.write_text(f"prompts: [a red car]\noutput_dir: {tmp_path / 'out'}\nbase_model: /nowhere\n" + extra)
    result = CliRunner().invoke(cli, ["finetune", "ddpo", "--config", str(run)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error: ")
    assert not (tmp_path / "out").exists()


def test_worker_counts_a_config_cannot_split_are_refused_before_ray_starts(tmp_path):
    """The fine-tuner's own check_workers, called through the contract (no Ray needed)."""
    from harness.finetune.ray_train import train_on_ray

    def cfg(cls, out, **kw):
        return load_config(cls, dict(prompts=["a red car", "a cat"], output_dir=str(tmp_path / out), **kw))

    with pytest.raises(HarnessError, match=r"sample_num_batches_per_epoch \(3\) must be a multiple of --workers \(2\)"):
        train_on_ray("ddpo", cfg(DDPOConfig, "a", sample_num_batches_per_epoch=3), workers=2)
    with pytest.raises(HarnessError, match="SFT with 3 workers needs at least 3 prompts"):
        train_on_ray("sd_sft", cfg(SFTConfig, "b"), workers=3)
    with pytest.raises(HarnessError, match="normalizer 'zscore' needs 2 or more images"):
        train_on_ray("ddpo", cfg(DDPOConfig, "c", normalizer="zscore"), workers=2)
    with pytest.raises(HarnessError, match="needs a DDPOConfig, got a SFTConfig"):
        train_on_ray("ddpo", cfg(SFTConfig, "d"), workers=2)
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_load_config_is_generic():
    from dataclasses import dataclass, field

    @dataclass
    class Group:
        level: float = 0.5
        count: int = 1

    @dataclass
    class Settings:
        name: str = "x"
        rate: float | None = None
        group: Group = field(default_factory=Group)

        def validate(self):
            if self.group.count > 5:
                raise HarnessError("config 'group.count' must be <= 5")

    got = load_config(Settings, {"rate": 10, "group": {"level": 2, "count": 3.0}})
    assert got == Settings(rate=10.0, group=Group(level=2.0, count=3))
    assert isinstance(got.rate, float) and isinstance(got.group.level, float)
    assert isinstance(got.group.count, int)
    with pytest.raises(HarnessError, match=r"unknown config key 'group.levle'. Did you mean 'level'"):
        load_config(Settings, {"group": {"levle": 1}})
    with pytest.raises(HarnessError, match="'group.count' must be <= 5"):
        load_config(Settings, {}, group={"count": 6})
    # The SD configs: YAML's 10 for a float setting (and normalizer_scale) becomes 10.0.
    cfg = load_config(DDPOConfig, {"prompts": ["a"], "train_learning_rate": 1, "normalizer_scale": 10})
    assert cfg.train_learning_rate == 1.0 and isinstance(cfg.train_learning_rate, float)
    assert cfg.normalizer_scale == 10.0 and isinstance(cfg.normalizer_scale, float)


def test_normalizer_scale_is_shorthand_for_the_scale_hyperparameter():
    from harness.finetune.reward import make_normalizer, normalizer_options

    cfg = load_config(DDPOConfig, {"prompts": ["a"], "normalizer": "textnorm", "normalizer_scale": 10})
    assert normalizer_options(cfg) == {"scale": 10.0}
    raw = np.array([[0.3, 0.1, 0.2], [0.0, 0.4, 0.1]])
    got = make_normalizer("textnorm", 1, normalizer_options(cfg))({"m": raw})
    np.testing.assert_allclose(got, [np.exp(10 * r[0]) / np.exp(10 * r).sum() for r in raw], rtol=1e-12)
    both = load_config(DDPOConfig, {"prompts": ["a"], "normalizer": "textnorm", "normalizer_scale": 10,
                                    "normalizer_options": {"scale": 3}})
    with pytest.raises(HarnessError, match="sets the scale twice"):
        normalizer_options(both)
    alone = load_config(DDPOConfig, {"prompts": ["a"], "normalizer_scale": 10})
    with pytest.raises(HarnessError, match="'normalizer_scale' is set but no 'normalizer'"):
        normalizer_options(alone)
