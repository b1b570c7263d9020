"""Fine-tuning Stable Diffusion against a reward: configs, DDIM log-probabilities, LoRA, monitor."""
