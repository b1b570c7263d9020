"""Fine-tuning through contracts: the reward (reward models + Normalizer + prompt sets) and the
Ray Train launcher, composed around any registered :class:`harness.types.FineTuner`."""
