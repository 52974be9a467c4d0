"""One LightningModule per stage; each holds the model it trains as `.model`."""
