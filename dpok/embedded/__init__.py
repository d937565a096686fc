"""The embedded ShapeWorld text-to-image model: architectures, tokenizer, pretraining, reward model."""
