"""Reference models: tokenizer, configs, training, and the bundled checkpoints."""
