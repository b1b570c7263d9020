"""Fine-tuning is never silently wrong: divergence stops the run, checkpoints are whole or absent,
and resume is bitwise exact, with a real (tiny, random) CLIP reward in the loop too."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from tiny_models import make_tiny_clip, make_tiny_sd

from harness.cli import cli
from harness.config import load_config
from harness.errors import HarnessError
from harness_plugins.sd.config import DDPOConfig, SFTConfig
from harness_plugins.sd.ddpo import DDPOTrainer
from harness_plugins.sd.sft import SFTTrainer
from harness_plugins.sd.trainer import RewardTrainer, checkpoint_problem

pytestmark = pytest.mark.timeout(900)

KINDS = {"ddpo": (DDPOTrainer, DDPOConfig, {}),
         "sft": (SFTTrainer, SFTConfig, {"images_per_prompt": 4, "train_steps_per_round": 2})}
STEPS_PER_EPOCH = {"ddpo": 1, "sft": 2}


def brightness(images, prompts):
    return np.array([np.asarray(im, dtype=np.float64).mean() / 255 for im in images])


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "eps")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def settings(sd, out, kind="ddpo", **kw):
    base = dict(base_model=str(sd), prompts=["a red car", "a cat"], num_epochs=2, sample_num_steps=3,
                output_dir=str(out), sample_num_batches_per_epoch=1, sample_batch_size=4,
                train_batch_size=4, mixed_precision="no", **KINDS[kind][2])
    base.update(kw)
    return base


def trainer(kind, sd, out, reward=brightness, **kw):
    cls, cfg_cls, _ = KINDS[kind]
    return cls(load_config(cfg_cls, settings(sd, out, kind, **kw)), reward=reward)


def all_tensors_finite(folder):
    """Every tensor of every file under ``folder`` (weights, optimizer state) is finite."""
    found = 0
    for path in folder.rglob("*"):
        if path.suffix == ".safetensors":
            tensors = list(load_file(path).values())
        elif path.suffix == ".pt":
            state = torch.load(path, weights_only=True)["state"]
            tensors = [v for s in state.values() for v in s.values() if v.is_floating_point()]
        else:
            continue
        found += len(tensors)
        if not all(torch.isfinite(t).all() for t in tensors):
            return False
    assert found > 0
    return True


def error_line(result):
    """The one error line the CLI printed, last, after the progress bar's updates (no traceback)."""
    assert result.exit_code == 2, result.output[-2000:]
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and result.output.rstrip().endswith(lines[0]), result.output
    assert "Traceback" not in result.output
    return lines[0]


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. divergence --------------------------------------------------------------------------------
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full-unet"])
@pytest.mark.parametrize("kind", ["ddpo", "sft"])
def test_an_enormous_learning_rate_stops_the_cli_and_keeps_the_good_checkpoint(kind, use_lora, sd, clip,
                                                                               tmp_path):
    """Epoch 1 at a sane learning rate, then `--resume` with train_learning_rate=1e10: exit 2 with one
    line naming epoch 2 and its step, the epoch-1 checkpoint untouched and still the latest, no
    checkpoint of a later epoch, nothing non-finite on disk. (Before: NaN LoRA weights saved at
    every epoch and exit 0 "Trained 3 epochs".)"""
    out = tmp_path / "run"
    run = tmp_path / "run.yaml"
    cfg = settings(sd, out, kind, num_epochs=1, use_lora=use_lora, train_learning_rate=1e-4,
                   reward=f"clip:checkpoint={clip}")
    run.write_text(json.dumps(cfg))  # JSON is YAML
    first = CliRunner().invoke(cli, ["finetune", kind, "--config", str(run)])
    assert first.exit_code == 0, first.output[-2000:]
    good = out / "checkpoints" / "epoch-0001"
    before = snapshot(good)
    result = CliRunner().invoke(cli, ["finetune", kind, "--config", str(run), "--resume",
                                      "--set", "num_epochs=3", "--set", "train_learning_rate=1.0e+10"])
    line = error_line(result)
    assert line.startswith("Error: stopped at epoch 2, step "), line
    step = int(line.split("step ")[1].split(":")[0])
    per = STEPS_PER_EPOCH[kind]
    assert per < step <= 2 * per  # a step of epoch 2
    assert f"the last good checkpoint is {good}" in line
    assert "Lower train_learning_rate (now 1e+10)" in line and "--resume" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]
    assert snapshot(good) == before and checkpoint_problem(good) is None
    assert all_tensors_finite(out / "checkpoints")
    assert list(pd.read_csv(out / "train_log.csv")["epoch"]) == [1]
    print(kind, "lora" if use_lora else "full", line[7:140])


def test_a_diverged_run_that_never_saved_says_so(sd, tmp_path):
    """At 1e39 Adam's update overflows float32 in the first step: stopped there, nothing written."""
    with pytest.raises(HarnessError, match=r"^stopped at epoch 1, step 1: the optimizer's update "
                       r"overflowed float32; nothing of this epoch was saved and no checkpoint was "
                       r"written yet\. Lower train_learning_rate \(now 1e\+39\), then run again$"):
        trainer("ddpo", sd, tmp_path / "run", train_learning_rate=1e39).train()
    assert not (tmp_path / "run" / "checkpoints").exists()


def _nan_output(module, method, when):
    """Make ``module.method``'s output NaN on the calls for which ``when()`` holds."""
    original = getattr(module, method)

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        if when():
            out.sample = out.sample * float("nan")
        return out

    setattr(module, method, patched)


def test_each_non_finite_quantity_is_named(sd, tmp_path):
    """Loss, gradient, parameter, sample: each stops the run at its epoch and step, by name."""
    # A NaN gradient of one LoRA tensor, from the first backward pass.
    t = trainer("ddpo", sd, tmp_path / "grad")
    name = next(n for n, p in t.pipe.unet.named_parameters() if p is t.params[5])
    t.params[5].register_hook(lambda g: g * float("nan"))
    with pytest.raises(HarnessError, match=rf"^stopped at epoch 1, step 1: non-finite gradient \(NaN or "
                                           rf"infinity in 1 of {len(t.params)} tensors, first {name}\)"):
        t.train()
    # A NaN loss in epoch 2's second training forward pass of SFT (step 4).
    t = trainer("sft", sd, tmp_path / "loss", num_epochs=3)
    training_passes = []

    def second_of_epoch_2():
        if torch.is_grad_enabled():  # a training forward pass, not sampling
            training_passes.append(t.current_epoch)
        return torch.is_grad_enabled() and training_passes.count(2) == 2

    _nan_output(t.pipe.unet, "forward", second_of_epoch_2)
    with pytest.raises(HarnessError, match=r"^stopped at epoch 2, step 4: the loss is nan; .* the last good "
                                           r"checkpoint is .*epoch-0001\."):
        t.train()
    assert sorted(p.name for p in (tmp_path / "loss" / "checkpoints").iterdir()) == ["epoch-0001"]
    # A parameter the optimizer made NaN (the guard behind the gradient check).
    t = trainer("ddpo", sd, tmp_path / "param")
    step = t.optimizer.step

    def poisoned_step(*args, **kwargs):
        step(*args, **kwargs)
        with torch.no_grad():
            t.params[0][0, 0] = float("inf")

    t.optimizer.step = poisoned_step
    with pytest.raises(HarnessError, match=r"^stopped at epoch 1, step 1: the optimizer step made 1 of "
                                           r"\d+ parameter tensors non-finite \(first .*lora"):
        t.train()
    # NaN samples from the base model, before any training.
    t = trainer("ddpo", sd, tmp_path / "sample")
    _nan_output(t.pipe.vae, "decode", lambda: True)
    with pytest.raises(HarnessError, match=r"^stopped at epoch 1, step 1: sampling produced non-finite "
                                           r"images; .* The base model itself produces them"):
        t.train()
    for folder in ("grad", "param", "sample"):
        assert not (tmp_path / folder / "checkpoints").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_reward_names_the_reward_epoch_and_step(bad, sd, tmp_path):
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        out = brightness(images, prompts)
        if calls["n"] == 2:
            out[2] = bad
        return out

    with pytest.raises(HarnessError, match=rf"^stopped at epoch 2, step 3: reward 'flaky' returned {bad} for "
                                           r"prompt '.*' \(1 of 4 images non-finite\); .* the last good "
                                           r"checkpoint is .*epoch-0001\. Fix the reward"):
        trainer("sft", sd, tmp_path / "run", reward=flaky, images_per_prompt=4, sample_batch_size=4,
                prompts=["a red car"]).train()
    assert all_tensors_finite(tmp_path / "run" / "checkpoints")


def test_rewards_too_large_to_standardise_stop_ddpo(sd, tmp_path):
    with pytest.raises(HarnessError, match=r"^stopped at epoch 1, step 1: reward 'huge' values up to "
                                           r"1e\+308 are too large to standardise"):
        def huge(images, prompts):
            return np.full(len(images), 1e308)

        trainer("ddpo", sd, tmp_path / "run", reward=huge, per_prompt_stat_tracking=False).train()


def test_a_reward_model_returning_nan_is_named_through_the_cli(sd, tmp_path):
    """A CLIP checkpoint whose text projection is NaN, as the config's reward: exit 2, one line
    naming the reward model, the prompt, the epoch and the step."""
    from transformers import CLIPModel

    broken = make_tiny_clip(tmp_path / "clip")
    model = CLIPModel.from_pretrained(broken)
    with torch.no_grad():
        model.text_projection.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    run = tmp_path / "run.yaml"
    run.write_text(json.dumps(settings(sd, tmp_path / "out", reward=f"clip:checkpoint={broken}",
                                       normalizer="textnorm", normalizer_scale=10)))
    line = error_line(CliRunner().invoke(cli, ["finetune", "ddpo", "--config", str(run)]))
    assert line.startswith("Error: stopped at epoch 1, step 1: reward model 'clip' returned nan for image "
                           "0 of the batch against its prompt 'a red car'"), line


def test_monitor_names_a_heldout_reward_returning_nan(sd, tmp_path):
    cfg = load_config(DDPOConfig, settings(sd, tmp_path / "run", eval_prompts=["a dog"],
                                           eval_images_per_prompt=2))
    t = DDPOTrainer(cfg, reward=brightness, heldout={"broken": lambda images, prompts: [np.nan] * len(images)})
    with pytest.raises(HarnessError, match=r"^overoptimization monitor, epoch 0: reward 'broken' returned nan "
                                           r"for evaluation prompt 'a dog'"):
        t.train()


# -- 2. incomplete checkpoints ---------------------------------------------------------------------
def _leave(kind_of_leftover, ckpts):
    """What a run killed (or out of disk space) while writing epoch 3's checkpoint leaves behind."""
    src = ckpts / "epoch-0002"
    if kind_of_leftover == "temp folder":
        dst = ckpts / ".tmp-epoch-0003-4242"
        shutil.copytree(src, dst)
        (dst / "trainer_state.json").unlink()
    elif kind_of_leftover == "old temp folder":
        dst = ckpts / "epoch-0003.tmp"
        shutil.copytree(src, dst)
    elif kind_of_leftover == "no state file":
        dst = ckpts / "epoch-0003"
        shutil.copytree(src, dst)
        (dst / "trainer_state.json").unlink()
    else:  # truncated weights under the final name, state file present
        dst = ckpts / "epoch-0003"
        shutil.copytree(src, dst)
        weights = dst / "pytorch_lora_weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        state = json.loads((dst / "trainer_state.json").read_text())
        state["epoch"] = 3
        (dst / "trainer_state.json").write_text(json.dumps(state))
    return dst


@pytest.mark.parametrize("leftover", ["temp folder", "old temp folder", "no state file", "truncated weights"])
def test_resume_ignores_and_removes_incomplete_checkpoints(leftover, sd, tmp_path):
    straight = trainer("ddpo", sd, tmp_path / "straight", num_epochs=3).train()
    out = tmp_path / "killed"
    trainer("ddpo", sd, out, num_epochs=2).train()
    junk = _leave(leftover, out / "checkpoints")
    if leftover in ("no state file", "truncated weights"):
        assert checkpoint_problem(junk) is not None
    listed = RewardTrainer.checkpoints(SimpleNamespace(out=out))
    assert [p.name for p in listed] == ["epoch-0001", "epoch-0002"]  # never listed
    resumed = trainer("ddpo", sd, out, num_epochs=3, resume_from="latest")
    assert not junk.exists()  # removed
    assert resumed.epoch_done == 2
    result = resumed.train()
    assert [p.rsplit("/", 1)[-1] for p in result["checkpoints"]] == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    for name in ("pytorch_lora_weights.safetensors", "optimizer.pt"):
        assert ((tmp_path / "straight/checkpoints/epoch-0003" / name).read_bytes()
                == (out / "checkpoints/epoch-0003" / name).read_bytes())
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight["log"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in result["log"]]


def test_an_explicit_incomplete_checkpoint_and_a_mixed_output_dir_are_refused(sd, tmp_path):
    out = tmp_path / "run"
    trainer("ddpo", sd, out, num_epochs=2).train()
    (out / "checkpoints/epoch-0002/optimizer.pt").write_bytes(b"")
    with pytest.raises(HarnessError, match=r"resume_from '.*epoch-0002' is not a complete checkpoint "
                                           r"\(optimizer.pt has 0 bytes, not the \d+ recorded \(truncated\)\)"):
        trainer("ddpo", sd, out, resume_from=str(out / "checkpoints/epoch-0002"))
    with pytest.raises(HarnessError, match=r"output_dir '.*run' already holds checkpoints of a run "
                                           r"\(epoch-0001 to epoch-0001\): continue it with --resume"):
        trainer("ddpo", sd, out)
    with pytest.raises(HarnessError, match=r"holds checkpoints after the one resumed from .*: epoch-0003"):
        shutil.copytree(out / "checkpoints/epoch-0001", out / "checkpoints/epoch-0003")
        state = json.loads((out / "checkpoints/epoch-0003/trainer_state.json").read_text())
        (out / "checkpoints/epoch-0003/trainer_state.json").write_text(json.dumps({**state, "epoch": 3}))
        trainer("ddpo", sd, out, resume_from=str(out / "checkpoints/epoch-0001"))


def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing_partial(sd, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"
    t = trainer("ddpo", sd, out, num_epochs=3)
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "epoch-0002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(HarnessError, match=r"^cannot write checkpoint .*epoch-0002: No space left on "
                                           r"device; the partial folder was removed and the last complete "
                                           r"checkpoint is .*epoch-0001\. Free disk space"):
        t.train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]
    monkeypatch.setattr(torch, "save", save)
    assert trainer("ddpo", sd, out, num_epochs=3, resume_from="latest").train()["log"][-1]["epoch"] == 3


def test_resuming_with_a_lower_learning_rate_uses_it(sd, tmp_path):
    """After a divergence the fix is a lower learning rate and --resume: the optimizer must take the
    config's rate, not the one saved in its state."""
    out = tmp_path / "run"
    trainer("ddpo", sd, out, num_epochs=1, train_learning_rate=1e-2).train()
    t = trainer("ddpo", sd, out, num_epochs=2, resume_from="latest", train_learning_rate=1e-5)
    assert [g["lr"] for g in t.optimizer.param_groups] == [1e-5]


# -- 3. bitwise resume with a reward model ---------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "pickscore"])
def test_a_text_embedding_does_not_depend_on_its_batch_mates(name, clip):
    from harness.scoring.specs import load_reward_model

    spec = f"{name}:checkpoint={clip}" + (f",processor={clip}" if name == "pickscore" else "")
    prompts = ["a cat", "a realistic photo of two airplanes flying over the ocean at dawn",
               "three red apples", " ".join(["a photo of a red apple and a blue car"] * 12), "a frog"]
    alone = {}
    for p in prompts:
        model = load_reward_model(spec, device="cpu")
        alone[p] = model.text_embeddings([p])[0]
    model = load_reward_model(spec, device="cpu")
    together = model.text_embeddings(prompts)
    for p, e in zip(prompts, together, strict=True):
        assert torch.equal(e, alone[p]), p
    # So the same scoring call gives the same bits whatever the text cache met before, and with
    # whom: here each prompt was first seen in a pair with a prompt of another length.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    features = model.embed_images(model.preprocess(image)[None])
    other = load_reward_model(spec, device="cpu")
    for p in reversed(prompts):
        other.text_embeddings([p, "two dogs and " * len(p)])
    a, b = model.score(features, [prompts])[0], other.score(features, [prompts])[0]
    assert a.tobytes() == b.tobytes()


class Interrupted(Exception):
    pass


def test_resume_with_a_clip_reward_in_the_loop_is_bitwise_identical(sd, clip, tmp_path):
    """DDPO against TextNorm of a tiny random CLIP (contrastive prompts from the rules generator),
    with the overoptimization monitor and a held-out CLIP: killed in epoch 3 (with a half-written
    checkpoint left behind), then resumed, it ends with the same bits as an uninterrupted run:
    LoRA weights, optimizer state, train_log.csv, monitor.csv and the selected checkpoint. Three
    prompts drawn at random per batch, so the resumed run meets them in another order."""
    from harness.finetune.reward import RewardFunction

    def run(out, **kw):
        cfg = load_config(DDPOConfig, settings(
            sd, out, num_epochs=4, sample_batch_size=2, train_batch_size=2,
            prompts=["two red apples", "a realistic photo of a cat", "three blue cars on a road"],
            eval_prompts=["a dog"], eval_images_per_prompt=2, heldout_rewards=[f"clip:checkpoint={clip}"],
            train_learning_rate=3e-3, **kw))
        reward = RewardFunction(f"clip:checkpoint={clip}", normalizer="textnorm",
                                normalizer_options={"scale": 10}, contrastive="rules", device="cpu")
        return DDPOTrainer(cfg, reward=reward)

    straight = run(tmp_path / "straight").train()
    killed = run(tmp_path / "killed")
    epoch = killed.epoch

    def dies_in_epoch_3(e):
        if e == 3:
            (tmp_path / "killed/checkpoints/.tmp-epoch-0003-999").mkdir()
            raise Interrupted
        return epoch(e)

    killed.epoch = dies_in_epoch_3
    with pytest.raises(Interrupted):
        killed.train()
    resumed = run(tmp_path / "killed", resume_from="latest").train()
    a, b = tmp_path / "straight", tmp_path / "killed"
    for name in ("pytorch_lora_weights.safetensors", "optimizer.pt"):
        last = "checkpoints/epoch-0004/" + name
        assert (a / last).read_bytes() == (b / last).read_bytes()
    drop = ["seconds"]
    pd.testing.assert_frame_equal(pd.read_csv(a / "train_log.csv").drop(columns=drop),
                                  pd.read_csv(b / "train_log.csv").drop(columns=drop), check_exact=True)
    assert (a / "monitor.csv").read_bytes() == (b / "monitor.csv").read_bytes()
    assert (a / "selected_checkpoint.json").read_bytes() == (b / "selected_checkpoint.json").read_bytes()
    assert resumed["selected"] == straight["selected"]
    rewards = pd.read_csv(a / "train_log.csv")["reward_mean"]
    assert rewards.between(0, 1).all() and rewards.nunique() == 4  # real, varying TextNorm rewards
    print("reward_mean per epoch", rewards.tolist(), "selected", straight["selected"])
