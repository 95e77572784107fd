"""The worker process: one engine instance (per GPU or CPU slot) and its agent."""
