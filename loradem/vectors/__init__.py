"""Distribution vectors: reading LoRA adapters as deltas, their cards, the base checkpoint they belong to, similarities."""
