"""What the command-line tools print: one line per event, prefixed with the tool's name, from one process.

Library code logs (`logging`); the CLIs (`hive-train`, `hive-reproduce`, ...) say what they are doing through
here, so a run's console reads as one story however many ranks it has.
"""

from __future__ import annotations

from .distributed import is_main_process


def say(tool: str, message: str) -> None:
    """Print `[tool] message` from the main process (rank 0, or the only process)."""
    if is_main_process():
        print(f"[{tool}] {message}", flush=True)
