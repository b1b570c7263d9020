"""Fine-tuning Stable Diffusion against a reward: the ``sd_sft`` and ``sd_ddpo`` fine-tuners.

The machinery they share lives beside them: configs (``config``), DDIM log-probabilities, LoRA
and sampling (``diffusion``), the trainer base with checkpoints and exact resume (``trainer``)
and the overoptimization monitor (``monitor``). The core knows none of it: it calls the
:class:`harness.types.FineTuner` contract only.
"""

from harness.hookspecs import hookimpl


@hookimpl
def register_finetuners(register):
    from harness_plugins.sd.ddpo import SDDDPO
    from harness_plugins.sd.sft import SDSFT

    register(SDSFT, aliases=("sft",))
    register(SDDDPO, aliases=("ddpo",))
