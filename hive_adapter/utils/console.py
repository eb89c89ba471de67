"""What the command-line tools print: one line per event, prefixed with the tool's name, from one process.

Library code logs (`logging`); the CLIs (`hive-train`, `hive-reproduce`, ...) say what they are doing through
here, so a run's console reads as one story however many ranks it has. Progress bars are for terminals: in a
log file or a CI job a redrawn bar is hundreds of lines of noise, so without a terminal they are off and the
tools print a line per logging step instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from .distributed import is_main_process

T = TypeVar("T")

# DeepSpeed says this whenever it is imported without a GPU, also when nobody uses it: accelerate imports it
# from every `save_pretrained` once it is installed. A user who has no GPU can do nothing about it.
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU. If you have GPU or other accelerator"


def say(tool: str, message: str) -> None:
    """Print `[tool] message` from the main process (rank 0, or the only process)."""
    if is_main_process():
        print(f"[{tool}] {message}", flush=True)


def on_a_terminal() -> bool:
    """Whether progress bars would be seen as bars (stderr is a terminal), not as redraws in a log."""
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], *, description: str, total: int | None = None) -> Iterator[T]:
    """`tqdm` on a terminal, the bare iterable elsewhere."""
    if not on_a_terminal():
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=description, total=total, leave=False))


def quiet_progress_bars(*, reloads_models: bool = False) -> None:
    """For a CLI's entry point: transformers' and the Hub's progress bars off without a terminal, and also on one
    for a tool that reloads checkpoints again and again (a "Loading weights" bar per reload says nothing)."""
    if reloads_models or not on_a_terminal():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class _DropDeepSpeedCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return DEEPSPEED_CPU_NOTICE not in record.getMessage()


def drop_deepspeed_cpu_notice() -> None:
    """Filter DeepSpeed's CPU notice where it is raised (its "DeepSpeed" logger); every other record passes."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(existing, _DropDeepSpeedCpuNotice) for existing in logger.filters):
        logger.addFilter(_DropDeepSpeedCpuNotice())
