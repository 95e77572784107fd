"""Model weights: built-in tiny model, Hugging Face folders, GGUF files."""
