"""``harness finetune ID``: run any registered fine-tuner through the FineTuner contract."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.options import MAX_PROCESSES, TEXT, PathArg, RayAddress, RegisteredId
from harness.cli.root import cli


@cli.command("finetune")
@click.argument("method", metavar="ID", type=RegisteredId("finetuners"))
@click.option("--config", "config_path", type=PathArg(exists=True, dir_okay=False), required=True,
              help="YAML file of settings (see docs/finetune.md).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", type=TEXT, help="Override a config setting.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output_dir.")
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Train (data-parallel workers).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, MAX_PROCESSES), help="Ray Train workers (with --ray).")
@click.option("--address", default=None, type=RayAddress(), help="Ray cluster address (with --ray; default: a local instance).")
@click.option("--max-failures", default=2, show_default=True, type=click.IntRange(0, MAX_PROCESSES), help="Worker-group restarts from the last checkpoint (with --ray).")
def finetune_command(method: str, config_path: Path, overrides: tuple[str, ...], resume: bool,
                     use_ray: bool, workers: int, address: str | None, max_failures: int) -> None:
    """Fine-tune a text-to-image model against a reward with the fine-tuner ID.

    ID is any registered fine-tuner id or alias; `harness plugins` lists them (the built-in
    ones fine-tune Stable Diffusion with LoRA by DDPO or reward-filtered SFT).
    """
    from harness.config import load_config, parse_overrides
    from harness.plugins import get_plugins

    tuner = get_plugins().finetuners.get(method)()
    extra = parse_overrides(overrides)
    if resume:
        extra["resume_from"] = "latest"
    config = load_config(tuner.config_class, config_path, **extra)
    if use_ray:
        from harness.finetune.ray_train import train_on_ray

        result = train_on_ray(tuner, config, workers, address=address, max_failures=max_failures)
        where = "on Ray Train"
    else:
        from harness.finetune.reward import reward_from_settings

        result = tuner.train(config, reward_from_settings(config), progress=True)
        where = ""
    last = result.log[-1] if result.log else {}
    epochs = last.get("epoch", len(result.log))
    line = f"Trained {epochs} epoch{'' if epochs == 1 else 's'}{' ' + where if where else ''}"
    if isinstance(last.get("reward_mean"), (int, float)):
        line += f"; last mean reward {last['reward_mean']:.4f}"
    if result.checkpoints:
        line += f"; {len(result.checkpoints)} checkpoints, the last {result.checkpoints[-1]}"
    else:
        line += f"; no checkpoints (output in {result.output_dir})"
    click.echo(line, err=True)
    if result.selected and result.selected.get("epoch") is not None:
        click.echo(f"Selected checkpoint: epoch {result.selected['epoch']} "
                   f"(wins over the base model per epoch: {result.selected.get('wins')})", err=True)
