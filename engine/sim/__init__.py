"""The sim executor and its latency models."""
