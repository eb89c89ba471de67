"""LLaVA checkpoints whose HIVE blocks are named by position, loaded through `from_pretrained`.

hive-adapter named a LLaVA connector's blocks `mm_projector.hive_blocks.<k>` (the k-th block) before it named
them by decoder layer, as its Hugging Face front end does. `HiveLlavaModules` renames such keys itself whenever
a state dict reaches it through `load_state_dict` (`mm_projector.bin`, LLaVA's builder with a model base,
`non_lora_trainables.bin`, transformers 4.37's plain `from_pretrained`). transformers' other `from_pretrained`
paths set each parameter by its name without asking the module (4.37 with `low_cpu_mem_usage`, as LLaVA's
builder loads, and under ZeRO-3; every path of transformers 5): there a block saved by position lands in the
decoder layer of its number, or nowhere. `reload_blocks_saved_by_position` runs after them (LLaVA's
`from_pretrained`, patched) and, for such a checkpoint only, loads the connector's tensors again from the same
files through the module. A checkpoint with today's names costs a look at its key names.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .modules import HiveLlavaModules, hive_modules_of

logger = logging.getLogger(__name__)

CONNECTOR = "mm_projector."
# from_pretrained's arguments that say where its files are
HUB_ARGUMENTS = ("cache_dir", "revision", "subfolder", "token", "local_files_only")


def reload_blocks_saved_by_position(model: nn.Module, pretrained_model_name_or_path, **kwargs: Any) -> bool:
    """After `from_pretrained(pretrained_model_name_or_path, **kwargs)` built `model`: when the checkpoint names
    the connector's blocks by position, load its connector tensors again, renamed. True when it did."""
    modules = hive_modules_of(model)
    if modules is None or pretrained_model_name_or_path is None or kwargs.get("state_dict") is not None:
        return False
    hub = {name: kwargs[name] for name in HUB_ARGUMENTS if kwargs.get(name) is not None}
    files = _weight_files(str(pretrained_model_name_or_path), hub)
    keys = {file: [key for key in _keys(file) if CONNECTOR in key] for file in files}
    names = [key for file_keys in keys.values() for key in file_keys]
    if not names:
        return False
    prefix = names[0][: names[0].index(CONNECTOR) + len(CONNECTOR)]  # "model.mm_projector."
    if not modules.saved_by_position(names, prefix):
        return False
    state = {}
    for file, file_keys in keys.items():
        state.update(_tensors(file, [key for key in file_keys if key.startswith(prefix)]))
    _load(modules, {key[len(prefix) :]: tensor for key, tensor in state.items()}, model.get_input_embeddings().weight)
    logger.info(
        "HIVE (LLaVA): %s names its blocks by position; loaded them by decoder layer", pretrained_model_name_or_path
    )
    return True


def _resolve(path: str, filename: str, hub: dict[str, Any]) -> str | None:
    from transformers.utils import cached_file

    return cached_file(
        path,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub,
    )


def _weight_files(path: str, hub: dict[str, Any]) -> list[str]:
    """The checkpoint files holding the connector, found as `from_pretrained` finds them (safetensors first)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    for single_name, index_name in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        single = _resolve(path, single_name, hub)
        if single is not None:
            return [single]
        index = _resolve(path, index_name, hub)
        if index is not None:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if CONNECTOR in key})
            return [file for file in (_resolve(path, shard, hub) for shard in shards) if file is not None]
    return []


def _keys(file: str) -> list[str]:
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as weights:
            return list(weights.keys())
    return list(torch.load(file, map_location="cpu", weights_only=True, mmap=True))


def _tensors(file: str, keys: list[str]) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as weights:
            return {key: weights.get_tensor(key) for key in keys}
    weights = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return {key: weights[key].clone() for key in keys}


def _load(modules: HiveLlavaModules, state: dict[str, torch.Tensor], reference: torch.Tensor) -> None:
    """`modules.load_state_dict(state)` (which renames the blocks), wherever the parameters are: partitioned by
    ZeRO-3 (gathered, loaded on rank 0, partitioned again), left on `meta` (transformers' low-memory path leaves a
    block it found no key for there: assigned, then put on the language model's device and dtype, gates and norms
    staying float32), or plain tensors (copied into)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(modules.parameters()), modifier_rank=0):
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                modules.load_state_dict(state)
        return
    if any(tensor.is_meta for tensor in itertools.chain(modules.parameters(), modules.buffers())):
        modules.load_state_dict(state, assign=True)
        modules.to(device=reference.device, dtype=reference.dtype)
        return
    modules.load_state_dict(state)
