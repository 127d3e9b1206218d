"""Training with Lightning: the LightningModule, data module, callbacks, feature cache and train(settings)."""
