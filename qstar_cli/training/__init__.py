"""Training on the output: a TRL ``SFTTrainer`` that weights each sequence's loss."""
