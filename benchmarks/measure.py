"""Activation memory, step time and generation cost of the compared modes.

- Activation memory: bytes of the tensors autograd saves for backward during one training forward
  (`saved_tensors_hooks`), parameters excluded. Deterministic, works on `meta` at full scale; views
  of one tensor count separately, the same way for every mode. On `meta` attention saves what the
  reference (math) kernel saves, attention probabilities included: an upper bound that inflates
  concat's quadratic term most, so a CPU-sized pair is also measured with the real kernels.
- Step time: forward + backward, the modes interleaved round after round in one process, median.
- Generation: prefill and per-token decode time, and the bytes each mode caches per prompt (the
  LLM's KV cache; for HIVE also the vision K/V every block computes once per prompt).
"""

from __future__ import annotations

import statistics
import time

import torch

from .configs import TEXT_TOKENS, ModelPair
from .models import build, set_stage, training_batch, training_step


def saved_activation_bytes(
    pair: ModelPair,
    mode: str,
    *,
    stage: int,
    batch: int = 1,
    text_tokens: int = TEXT_TOKENS,
    device: str = "meta",
    image_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    model = build(pair, mode, device=device, image_size=image_size, dtype=dtype)
    set_stage(model, mode, stage)
    inputs = training_batch(
        pair, mode, batch=batch, text_tokens=text_tokens, device=device, image_size=image_size,
        dtype=dtype or torch.float32,
    )  # fmt: skip
    parameters = {id(p) for p in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in parameters and id(base) not in parameters:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(
    pair: ModelPair,
    modes: list[str],
    *,
    stage: int,
    batch: int,
    text_tokens: int = TEXT_TOKENS,
    rounds: int = 5,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
    attn_implementation: str = "sdpa",
) -> dict[str, dict]:
    """Median training-step seconds per mode, modes interleaved round after round (every model stays
    resident, so peak memory is measured apart: `peak_step_memory`)."""
    device = torch.device(device)
    models, batches = {}, {}
    for mode in modes:
        torch.manual_seed(0)
        models[mode] = build(
            pair, mode, device=device, dtype=dtype, image_size=image_size, attn_implementation=attn_implementation
        )
        set_stage(models[mode], mode, stage)
        batches[mode] = training_batch(
            pair, mode, batch=batch, text_tokens=text_tokens, device=device, image_size=image_size, dtype=dtype
        )
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_index in range(rounds + 1):  # round 0 warms up
        for mode in modes:
            models[mode].zero_grad(set_to_none=True)
            synchronize(device)
            start = time.perf_counter()
            training_step(models[mode], batches[mode])
            synchronize(device)
            if round_index:
                times[mode].append(time.perf_counter() - start)
    return {mode: {"median_s": statistics.median(values), "all_s": values} for mode, values in times.items()}


def peak_step_memory(
    pair: ModelPair,
    mode: str,
    *,
    stage: int,
    batch: int,
    text_tokens: int = TEXT_TOKENS,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
) -> int:
    """Peak CUDA bytes of one training step of `mode` alone on the device (its weights, gradients and
    activations; no optimizer): the model is built, stepped once to warm up, measured, and freed."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = build(pair, mode, device=device, dtype=dtype, attn_implementation=attn_implementation)
    set_stage(model, mode, stage)
    inputs = training_batch(pair, mode, batch=batch, text_tokens=text_tokens, device=device, dtype=dtype)
    training_step(model, inputs)
    model.zero_grad(set_to_none=True)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    training_step(model, inputs)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, inputs
    torch.cuda.empty_cache()
    return peak


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def generation_costs(
    pair: ModelPair,
    mode: str,
    *,
    new_tokens: int = 16,
    text_tokens: int = TEXT_TOKENS,
    rounds: int = 3,
    device: str = "cpu",
) -> dict:
    """Prefill seconds, decode seconds per token and cached bytes for one prompt (greedy, KV cache on)."""
    torch.manual_seed(0)
    model = build(pair, mode, device=device).eval()
    inputs = training_batch(pair, mode, batch=1, text_tokens=text_tokens, device=device)
    inputs.pop("labels")
    common = {"do_sample": False, "use_cache": True, "pad_token_id": 0}

    def timed(count: int) -> float:
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, **common)
        return time.perf_counter() - start

    timed(2)  # warm-up
    prefill = statistics.median(timed(1) for _ in range(rounds))
    full = statistics.median(timed(new_tokens + 1) for _ in range(rounds))
    output = model(**inputs, use_cache=True)
    kv_bytes = _cache_bytes(output.past_key_values)
    runtime = getattr(model, "hive_runtime", None)
    vision_kv_bytes = runtime.cached_vision_bytes(output.past_key_values) if runtime is not None else 0
    return {
        "prefill_s": prefill,
        "decode_s_per_token": (full - prefill) / new_tokens,
        "text_kv_cache_bytes": kv_bytes,
        "vision_kv_cache_bytes": vision_kv_bytes,
        "cache_bytes": kv_bytes + vision_kv_bytes,
        "prompt_positions": output.logits.shape[1],
    }
