"""Execute a plan: recipe, optimizers, the LightningModule, callbacks, checkpoints, DDP."""
