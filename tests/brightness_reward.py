"""A planted reward for fine-tuning tests: mean image brightness in [0, 1].

Also the Ray Train tests' instrumented fine-tuners: the SD fine-tuners with a trainer that runs
a test hook after every epoch on every worker (before the epoch is reported to Ray Train). They
travel to the workers by value (the tests register this module for pickling by value).
"""

import numpy as np


def brightness(images, prompts):
    return np.array([np.asarray(im, dtype=np.float64).mean() / 255 for im in images])


def make():
    """Factory for shared reward actors."""
    return brightness


def record_weights(trainer):
    """Test hook run by every Ray Train worker after each epoch: write its LoRA weights' sum."""
    import json
    import os
    from pathlib import Path

    total = float(sum(p.detach().double().sum() for p in trainer.params))
    folder = Path(trainer.config.output_dir) / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{trainer.rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": trainer.epoch_done, "sum": total, "pid": os.getpid()}) + "\n")


def die_once(trainer):
    """Test hook: worker 1 is killed at the end of epoch 2, once."""
    import os
    from pathlib import Path

    record_weights(trainer)
    marker = Path(trainer.config.output_dir) / "killed-once"
    if trainer.rank == 1 and trainer.epoch_done == 2 and not marker.exists():
        marker.write_text("worker 1 killed at epoch 2\n")
        os._exit(1)


def instrumented(tuner_cls, hook):
    """``tuner_cls`` whose trainer calls ``hook(trainer)`` after every epoch, before reporting."""
    base = tuner_cls.trainer_class

    class Trainer(base):
        def after_epoch(self, saved, logs):
            hook(self)
            super().after_epoch(saved, logs)

    class Tuner(tuner_cls):
        trainer_class = Trainer

    Trainer.__name__ = Trainer.__qualname__ = f"Instrumented{base.__name__}"
    Tuner.__name__ = Tuner.__qualname__ = f"Instrumented{tuner_cls.__name__}"
    return Tuner()

