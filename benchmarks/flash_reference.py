"""A CPU stand-in for flash-attn 2's varlen interface: reference math plus flash-attn's own argument checks.

No GPU is needed to run the flash code paths: `installed()` puts `flash_attn_varlen_func` / `flash_attn_func` where
both callers find flash-attn, so that the flash path of HIVE's cross-attention and transformers'
`attn_implementation="flash_attention_2"` run in `make test` and in `make gpu-check --dry_run`:

- a `flash_attn` module in `sys.modules` (what `hive_adapter.model.cross_attention` imports), with CPU among the
  devices HIVE hands to flash-attn;
- transformers' lazily imported kernel (`modeling_flash_attention_utils._flash_varlen_fn` and its siblings, the
  globals `lazy_import_flash_attention` returns once an implementation is loaded).

The checks are flash-attn 2's (`csrc/flash_attn/flash_api.cpp`, `mha_varlen_fwd`): fp16/bf16 only, K/V in the
query's dtype, head_dim <= 256, last dimension contiguous, int32 cu_seqlens of batch + 1 entries, query heads a
multiple of K/V heads; and `max_seqlen` no shorter than the longest sequence (flash-attn would read past it). The
math is softmax attention in float32 per sequence, rounded to the query's dtype, with flash-attn's causal
alignment (bottom-right when a sequence has fewer queries than keys). `calls` counts the kernel calls: the spy
that proves flash ran.
"""

from __future__ import annotations

import math
import sys
import types
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

HALF = (torch.float16, torch.bfloat16)
calls: Counter = Counter()  # "varlen" / "dense" -> calls since the last reset


def _check(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    if query.dtype not in HALF:
        raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type (got {query.dtype})")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise RuntimeError(f"query and key/value must have the same dtype ({query.dtype}, {key.dtype}, {value.dtype})")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.ndim != 3:
            raise RuntimeError(f"{name} must be (total, heads, head_dim), got shape {tuple(tensor.shape)}")
        if tensor.stride(-1) != 1:
            raise RuntimeError(f"{name} must have contiguous last dimension")
    head_dim = query.shape[-1]
    if head_dim > 256:
        raise RuntimeError(f"FlashAttention forward only supports head dimension at most 256 (got {head_dim})")
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        raise RuntimeError("query, key and value must share the head dimension")
    if query.shape[1] % key.shape[1] or key.shape[1] != value.shape[1]:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32:
            raise RuntimeError(f"{name} must have dtype int32 (got {cu.dtype})")
        if cu.ndim != 1 or not cu.is_contiguous():
            raise RuntimeError(f"{name} must be a contiguous 1-D tensor")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must have batch_size + 1 entries each")
    if int(cu_seqlens_q[-1]) > query.shape[0] or int(cu_seqlens_k[-1]) > key.shape[0]:
        raise RuntimeError("cu_seqlens point past the end of the packed query/key")
    for name, cu, bound in (("max_seqlen_q", cu_seqlens_q, max_seqlen_q), ("max_seqlen_k", cu_seqlens_k, max_seqlen_k)):
        longest = int(cu.diff().max()) if cu.numel() > 1 else 0
        if int(bound) < longest:
            raise RuntimeError(f"{name}={int(bound)} is shorter than the longest sequence ({longest})")


def _attend(query, key, value, *, scale: float, causal: bool) -> torch.Tensor:
    """(q, heads, d), (k, kv_heads, d) -> (q, heads, d), float32 softmax attention."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).float()
    value = value.repeat_interleave(groups, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", query.float(), key) * scale
    if causal:  # bottom-right aligned, as flash-attn >= 2.1
        rows, cols = scores.shape[-2:]
        allowed = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril(cols - rows)
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key left gets 0, as flash-attn
    return torch.einsum("hqk,khd->qhd", weights, value).to(query.dtype)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    calls["varlen"] += 1
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, block_table)  # fmt: skip


def _varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
    softcap, alibi_slopes, block_table,
):  # fmt: skip
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or block_table is not None:
        raise NotImplementedError("the reference kernel covers dropout 0, no window, no softcap, no alibi, no paging")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = q.new_zeros(q.shape)
    pieces = [
        _attend(q[q0:q1], k[k0:k1], v[k0:k1], scale=scale, causal=causal)
        for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:], strict=True)
    ]
    if pieces:
        out = torch.cat([*pieces, q.new_zeros(q.shape[0] - bounds_q[-1], *q.shape[1:])])
    return out


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False,
):  # fmt: skip
    """(batch, seq, heads, d): every row one sequence, through the varlen reference (counted as `dense` only)."""
    batch, length_q = q.shape[:2]
    length_k = k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * length_q, length_q, dtype=torch.int32)
    cu_k = torch.arange(0, (batch + 1) * length_k, length_k, dtype=torch.int32)
    calls["dense"] += 1
    flat = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
    out = _varlen(*flat, cu_q, cu_k, length_q, length_k, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, None)  # fmt: skip
    return out.view(batch, length_q, *q.shape[2:])


def _fake_package() -> types.ModuleType:
    package = types.ModuleType("flash_attn")
    package.__version__ = "2.8.3+reference"
    package.flash_attn_varlen_func = flash_attn_varlen_func
    package.flash_attn_func = flash_attn_func
    package.flash_attn_with_kvcache = None
    return package


@contextmanager
def installed() -> Iterator[Counter]:
    """Inside: HIVE's and transformers' flash-attn calls run the reference on any device; `calls` starts at 0."""
    from transformers import modeling_flash_attention_utils as fa

    from hive_adapter.model import cross_attention

    names = (
        "_loaded_implementation",
        "_flash_fn",
        "_flash_varlen_fn",
        "_flash_with_kvcache_fn",
        "_pad_fn",
        "_unpad_fn",
    )
    names += ("_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")
    saved = {name: getattr(fa, name) for name in names}
    saved_module = sys.modules.get("flash_attn")
    saved_devices = cross_attention.FLASH_DEVICE_TYPES
    sys.modules["flash_attn"] = _fake_package()
    cross_attention.flash_varlen_function.cache_clear()
    cross_attention.FLASH_DEVICE_TYPES = (*saved_devices, "cpu", "meta")
    fa._loaded_implementation = "flash_attention_2"
    fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = flash_attn_func, flash_attn_varlen_func, None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(flash_attn_varlen_func)
    fa._process_with_kvcache_kwargs_fn = dict
    calls.clear()
    try:
        yield calls
    finally:
        for name, value in saved.items():
            setattr(fa, name, value)
        if saved_module is None:
            sys.modules.pop("flash_attn", None)
        else:
            sys.modules["flash_attn"] = saved_module
        cross_attention.FLASH_DEVICE_TYPES = saved_devices
        cross_attention.flash_varlen_function.cache_clear()


def use_flash_language_model(language_model: torch.nn.Module) -> None:
    """Switch a language model to transformers' flash_attention_2 path without the CUDA availability check
    (`set_attn_implementation` refuses a CPU model): every config inside it that names an implementation."""
    for module in language_model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            config._attn_implementation_internal = "flash_attention_2"
