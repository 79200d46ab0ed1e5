"""Small models that ship with lora_core, for tests, tutorials and quick experiments."""
