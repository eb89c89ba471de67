"""Process-group helpers shared by the training entry points (`hive-train`, LLaVA's `train()` with HIVE).

Only torch is imported here, so LLaVA's pinned transformers world can use it too.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(use_deepspeed: bool) -> None:
    """Start the process group (gloo on CPU). Must precede loading under ZeRO-3.

    Parsing TrainingArguments may already have started torch.distributed (through accelerate); DeepSpeed's
    own communication layer still needs `deepspeed.init_distributed`, which adopts the existing group.
    """
    if world_size() == 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    elif not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    Left to interpreter shutdown, the communication threads of a gloo group can still be joinable when their
    destructors run, and a rank then aborts ("terminate called without an active exception", exit -6) after
    its work is saved, failing the launcher's run.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
