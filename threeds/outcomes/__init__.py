"""Does the selection help? Evaluation sets, `threeds eval`, LoRA training, experiments over arms and their statistics."""
