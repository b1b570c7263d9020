"""``harness finetune ID``: run a registered fine-tuner."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.root import cli
from harness.errors import HarnessError


@cli.command("finetune")
@click.argument("method", type=click.Choice(["sft", "ddpo"]))
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="YAML file of settings (see docs/finetune.md).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config setting.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output_dir.")
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Train (data-parallel workers).")
@click.option("--workers", default=2, show_default=True, help="Ray Train workers (with --ray).")
@click.option("--address", default=None, help="Ray cluster address (with --ray; default: a local instance).")
@click.option("--max-failures", default=2, show_default=True, help="Worker-group restarts from the last checkpoint (with --ray).")
def finetune_command(method: str, config_path: Path, overrides: tuple[str, ...], resume: bool,
                     use_ray: bool, workers: int, address: str | None, max_failures: int) -> None:
    """Fine-tune Stable Diffusion against a reward with SFT or DDPO (LoRA)."""
    import yaml

    from harness.plugins import get_plugins
    from harness_plugins.sd.config import load_config

    tuner = get_plugins().finetuners.get(f"sd_{method}")
    extra = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise HarnessError(f"--set expects KEY=VALUE, got '{item}'")
        extra[key.strip()] = yaml.safe_load(value)
    if resume:
        extra["resume_from"] = "latest"
    config = load_config(tuner.config_class, config_path, **extra)
    if use_ray:
        from harness.finetune.ray_train import train_on_ray

        result = train_on_ray(tuner.id, config, workers, address=address, max_failures=max_failures)
        click.echo(f"Ray Train finished {len(result['log'])} epochs; last checkpoint {result['checkpoint']}", err=True)
        return
    result = tuner.trainer_class(config, progress=True).train()
    last = result["log"][-1] if result["log"] else {}
    click.echo(f"Trained {config.num_epochs} epochs; last mean reward {last.get('reward_mean', float('nan')):.4f}; "
               f"checkpoints in {config.output_dir}/checkpoints", err=True)
    if result.get("selected"):
        click.echo(f"Selected checkpoint: epoch {result['selected']['epoch']} "
                   f"(wins over the base model per epoch: {result['selected']['wins']})", err=True)
