"""Process-group helpers shared by the training entry points (`hive-train`, LLaVA's `train()` with HIVE).

Only torch is imported here, so LLaVA's pinned transformers world can use it too.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import NoReturn

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


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any: ranks that must stop together decide together (one rank
    raising alone would leave the others waiting in their next collective for ever)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    vote = torch.tensor([float(flag)])
    if torch.distributed.get_backend() == "nccl":
        vote = vote.cuda()
    torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX)
    return bool(vote.item() > 0)


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    Entry points that launch ranks end with `exit_rank` after this (see there for why that is needed too).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_rank(code: int = 0) -> NoReturn:
    """End a rank of a multi-process run, after its work is saved and `shutdown_distributed` has run.

    `destroy_process_group` only forgets the groups; the C++ objects, with their gloo worker and transport
    threads, live as long as something references them. After a DeepSpeed run something always does: every
    engine and every ZeRO-3 parameter (`ds_process_group`), kept alive from autograd's C++ graph where the
    garbage collector cannot reach. With those threads still running while the interpreter finalizes, a
    rank can abort there ("terminate called without an active exception", exit -6) with its work already
    saved, and the launcher reports the whole run failed. So the rank leaves without finalization; exit
    handlers run and output is flushed first, as on a normal exit.
    """
    atexit._run_exitfuncs()  # logging.shutdown, and whatever the user's callbacks registered
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def exit_if_launched() -> None:
    """The last call of a training entry point: a launched rank (world size > 1) ends through `exit_rank`;
    a single process returns normally."""
    if world_size() > 1:
        exit_rank(0)


def rank_fingerprints(model: torch.nn.Module) -> list[dict]:
    """Every rank's view of the full weights (ZeRO-3 partitions gathered, FSDP shards made whole), compared
    on rank 0."""
    parameters = list(model.named_parameters())
    gathered = _gathered(parameters)
    with gathered:
        fingerprint = {}
        for name, param in parameters:
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param  # an FSDP2 DTensor shard
            fingerprint[name] = [float(whole.detach().float().sum()), float(whole.detach().float().abs().sum())]
    views = [None] * world_size()
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(views, fingerprint)
    else:
        views = [fingerprint]
    mismatched = [name for name in views[0] if any(view[name] != views[0][name] for view in views[1:])]
    if mismatched:
        raise RuntimeError(f"ranks disagree on {len(mismatched)} parameters, e.g. {mismatched[:3]}")
    return views


def _gathered(parameters):
    """ZeRO-3 partitions gathered on every rank for the duration (a no-op otherwise)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - old transformers
        return contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for _, p in parameters], modifier_rank=None)
    return contextlib.nullcontext()
