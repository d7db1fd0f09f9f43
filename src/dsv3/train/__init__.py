"""Training: tokenizer, data (packing, FIM), AdamW, schedules, balance-bias update, the trainer loop,
native checkpoints, metrics and plots."""
