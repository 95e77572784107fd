"""kvferry's command-line interface: `kvferry <command> ...` (see cli/main.py)."""
