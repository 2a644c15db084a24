"""Training the default model's projector and LoRA: conversations built from easy-vqa train images."""
