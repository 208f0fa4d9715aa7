"""One LoRA adapter per source with TRL's SFT trainer, and the data-mixing baseline."""
