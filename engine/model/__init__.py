"""The Llama decoder and its paged attention."""
