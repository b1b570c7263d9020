"""The hooks a t2i-harness plugin can implement.

Every ``register_*`` hook receives a ``register`` callback owned by the core: call it with a
class (cheap: no torch import, no weights) and optionally ``id=`` and ``aliases=``. The core
assigns ids, resolves aliases and produces "did you mean" errors, so lookup behaves the same
however many plugins are installed.
"""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("t2i_harness")
hookimpl = HookimplMarker("t2i_harness")


@hookspec
def register_reward_models(register):
    """Register :class:`harness.types.RewardModel` subclasses.

    :param register: ``register(cls, *, id=None, aliases=())``; ``id`` defaults to ``cls.id``.
    """


@hookspec
def register_normalizers(register):
    """Register :class:`harness.types.Normalizer` subclasses (TextNorm, ensembles, ...).

    :param register: ``register(cls, *, id=None, aliases=())``.
    """


@hookspec
def register_prompt_generators(register):
    """Register :class:`harness.types.PromptSetGenerator` subclasses.

    :param register: ``register(cls, *, id=None, aliases=())``.
    """


@hookspec
def register_finetuners(register):
    """Register :class:`harness.types.FineTuner` subclasses.

    :param register: ``register(cls, *, id=None, aliases=())``.
    """


@hookspec
def register_benchmarks(register):
    """Register :class:`harness.types.Benchmark` subclasses (e.g. TIA2).

    :param register: ``register(cls, *, id=None, aliases=())``.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``harness`` command line.

    :param cli: the root :class:`click.Group`; call ``cli.command()`` or ``cli.add_command``.
    """
