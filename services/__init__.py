"""The processes of a kvferry cluster: frontend, global scheduler and per-GPU workers."""
