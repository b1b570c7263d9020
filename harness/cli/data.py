"""``harness data download``: a benchmark's public annotation files (and images) onto this machine."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.options import PathArg, RegisteredId
from harness.cli.root import cli

#: The value :meth:`harness.types.Benchmark.download` gives the folder to pass as ``--images``.
IMAGES_FOLDER = "folder"


@cli.group("data")
def data_group() -> None:
    """Benchmark data: download annotation files and images."""


@data_group.command("download")
@click.argument("benchmark", type=RegisteredId("benchmarks"))
@click.option("--images", "with_images", is_flag=True,
              help="Also fetch the images where they are public (archives are unpacked).")
@click.option("--dest", type=PathArg(output=True, file_okay=False),
              help="Folder to download into (default: the benchmark's cache, where the harness "
                   "looks without --data).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar per file.")
def download_command(benchmark: str, with_images: bool, dest: Path | None, progress: bool) -> None:
    """Download BENCHMARK's files: pinned revisions, checked by sha256, resumable.

    An interrupted download continues where it stopped when run again. Prints every file with
    its sha256 and the --data/--images options to pass to `harness leaderboard`.
    """
    from harness.plugins import get_plugins

    bench = get_plugins().benchmarks.get(benchmark)()
    fetched = bench.download(dest, images=with_images, progress=progress)
    folders = [path for path, digest in fetched.items() if digest == IMAGES_FOLDER]
    files = {path: digest for path, digest in fetched.items() if digest != IMAGES_FOLDER}
    where = f" into {dest}" if dest is not None else " into the cache"
    click.echo(f"{bench.id}: {len(files)} file(s){where}")
    for path, digest in files.items():
        click.echo(f"  {path}  sha256 {digest}")
    options = []
    if dest is not None:
        options.append(f"--data {dest}")
    options += [f"--images {folder}" for folder in folders]
    if options:
        click.echo(f"Use: harness leaderboard {bench.id} {' '.join(options)}")
    else:
        click.echo(f"Use: harness leaderboard {bench.id} (it finds the files in the cache) "
                   "--images DIR")
