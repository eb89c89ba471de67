"""Gated cross-attention from text tokens to projected vision levels.

Follows Flamingo's gated block (`x + tanh(g) * f(x)`, `g` initialised to 0, so a freshly wrapped model
computes exactly what its base computed) with the paper's twist that each block reads one vision level
(supplementary §6). Text tokens are queries; vision features are keys and values, so image tokens never
pass through the LLM's self-attention or MLP (supplementary §8.1).

Kernels: `torch.nn.functional.scaled_dot_product_attention` by default; `"eager"` computes the softmax
explicitly and can return the attention weights (for the analysis tools); `"flash_attention_2"` is
used on CUDA when the `flash_attn` package imports and works with this torch, the query is fp16/bf16 with K/V of
the same dtype, head_dim <= 256, and every query row sees either all of its sample's keys or none (otherwise SDPA,
with the same numbers). SDPA gets grouped K/V heads (`enable_gqa`) only without a mask: a boolean mask with
`enable_gqa` leaves CUDA nothing but the math kernel (the flash kernel takes no mask, the memory-efficient one no
grouped heads), so where a mask is needed K/V are expanded to the query heads first.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# The devices flash-attn's kernels run on (the test suite's reference kernel adds "cpu").
FLASH_DEVICE_TYPES = ("cuda",)
FLASH_MAX_HEAD_DIM = 256  # flash-attn 2's limit


@functools.cache
def flash_varlen_function() -> Callable | None:
    """flash-attn's `flash_attn_varlen_func`, or None when the package is absent or does not load with this torch
    (a wheel built for another torch fails at import with an undefined symbol): then SDPA runs, with a warning."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        if not isinstance(error, ModuleNotFoundError) or error.name != "flash_attn":
            logger.warning("flash_attn is installed but does not load (%s); HIVE's cross-attention uses SDPA", error)
        return None
    except Exception as error:  # noqa: BLE001  (a broken extension raises anything: OSError, RuntimeError, ...)
        logger.warning("flash_attn is installed but does not load (%r); HIVE's cross-attention uses SDPA", error)
        return None
    if not callable(flash_attn_varlen_func):
        logger.warning("flash_attn has no callable flash_attn_varlen_func; HIVE's cross-attention uses SDPA")
        return None
    return flash_attn_varlen_func


REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def _own_parameters_to_float32(module: nn.Module, only: set[str] | None = None) -> None:
    """The module's own parameters (not its children's), and their gradients, back to float32 where a cast made
    them fp16/bf16 (`only`: just these names)."""
    for name, param in module._parameters.items():
        if param is not None and param.dtype in REDUCED_PRECISION and (only is None or name in only):
            param.data = param.data.float()
            if param.grad is not None:
                param.grad = param.grad.float()


class KeepsFloat32(nn.Module):
    """A module whose own parameters stay float32 through the module casts (`.to(bf16)`, `.half()`,
    `.bfloat16()`, transformers' loading): tiny, numerically sensitive tensors. docs/ARCHITECTURE.md §5.

    Only a cast made by the module call itself is undone: a parameter that is already fp16/bf16 when `.to(device)`
    runs stays so. DeepSpeed's bf16/fp16 engine casts each `p.data` and then moves the module; turning the gates and
    norms back to float32 there would make each ZeRO flat group (one buffer per parameter group, concatenated)
    float32, and with it every trainable parameter of the model. Under DeepSpeed they are bf16/fp16 in the module
    like the rest, and their float32 master copy is the ZeRO optimizer's; the forward computes both in float32."""

    def _apply(self, fn, recurse: bool = True):
        float32 = {name for name, p in self._parameters.items() if p is not None and p.dtype == torch.float32}
        super()._apply(fn, recurse)
        _own_parameters_to_float32(self, only=float32)
        return self


def keep_float32(module: nn.Module) -> None:
    """Every `KeepsFloat32` inside `module` back to float32 (after a construction under a reduced default dtype,
    as transformers 4.37's `from_pretrained(torch_dtype=...)` does for the LLaVA repo's models)."""
    for sub in module.modules():
        if isinstance(sub, KeepsFloat32):
            _own_parameters_to_float32(sub)


class HiveLayerNorm(KeepsFloat32, nn.LayerNorm):
    """LayerNorm that keeps its parameters and arithmetic in float32 under bf16/fp16 bases."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(hidden.float(), self.normalized_shape, weight, bias, self.eps).to(hidden.dtype)


class HiveCrossAttention(nn.Module):
    """Multi-head cross-attention with grouped K/V heads (text queries, vision keys/values).

    Projections are named `hive_q_proj` ... so that PEFT's suffix matching (`target_modules=["q_proj"]`)
    adapts the LLM's own attention and never HIVE's.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        media_size: int | None = None,
        implementation: str = "sdpa",
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_key_value_heads={num_kv_heads}: must divide num_attention_heads={num_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.implementation = implementation
        self.hidden_size = hidden_size
        self.media_size = media_size = media_size or hidden_size  # width of the features K/V are made from
        self.hive_q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.hive_k_proj = nn.Linear(media_size, num_kv_heads * head_dim, bias=False)
        self.hive_v_proj = nn.Linear(media_size, num_kv_heads * head_dim, bias=False)
        self.hive_o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def key_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, keys, media) -> key, value each (batch, kv_heads, keys, head_dim)."""
        batch, keys, _ = media.shape
        media = media.to(self.hive_k_proj.weight.dtype)
        key = self.hive_k_proj(media).view(batch, keys, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.hive_v_proj(media).view(batch, keys, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return key, value

    def forward(
        self,
        hidden: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        visible: torch.Tensor,
        *,
        return_weights: bool = False,
        all_visible: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden (batch, text, hidden); visible (batch, text, keys) bool, True where a query may look;
        `all_visible`: whether `visible` is all True, where the caller knows (else read here, one host sync).

        Rows with no visible key must already be fully True (the caller zeroes their output), so no
        softmax ever runs over an empty row and no NaN reaches the backward pass.
        """
        batch, text, _ = hidden.shape
        query = self.hive_q_proj(hidden.to(self.hive_q_proj.weight.dtype))
        query = query.view(batch, text, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, text, head_dim)
        weights = None
        if return_weights or self.implementation == "eager":
            output, weights = self._eager(query, key, value, visible)
        elif self.implementation == "flash_attention_2" and (plan := _flash_plan(query, key, value, visible)):
            output = self._flash(query, key, value, *plan)
        else:
            output = self._sdpa(query, key, value, visible, all_visible)
        output = output.transpose(1, 2).reshape(
            batch, text, self.num_heads * self.head_dim
        )  # (batch, text, heads*head_dim)
        return self.hive_o_proj(output), weights

    def _eager(self, query, key, value, visible):
        groups = self.num_heads // self.num_kv_heads
        key = key.repeat_interleave(groups, dim=1)  # (batch, heads, keys, head_dim)
        value = value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (batch, heads, text, keys)
        scores = scores.masked_fill(~visible[:, None], torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return torch.matmul(weights, value), weights

    def _sdpa(self, query, key, value, visible, all_visible: bool | None):
        """SDPA with no mask (grouped K/V heads kept) when every query sees every key, else with the mask and K/V
        expanded to the query heads (`all_visible` None: read here, one host sync; on `meta` nothing to read)."""
        grouped = self.num_heads != self.num_kv_heads
        if all_visible is None:
            all_visible = visible.device.type != "meta" and bool(visible.all())
        if all_visible:
            return F.scaled_dot_product_attention(query, key, value, enable_gqa=grouped)
        if grouped:
            groups = self.num_heads // self.num_kv_heads
            key = key.repeat_interleave(groups, dim=1)  # (batch, heads, keys, head_dim)
            value = value.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=visible[:, None])

    def _flash(self, query, key, value, key_valid, longest_keys):
        batch, heads, text, head_dim = query.shape
        key_lengths = key_valid.sum(-1, dtype=torch.int32)
        cu_keys = F.pad(key_lengths.cumsum(0, dtype=torch.int32), (1, 0))
        cu_text = torch.arange(0, (batch + 1) * text, text, dtype=torch.int32, device=query.device)
        flat_query = query.transpose(1, 2).reshape(batch * text, heads, head_dim)  # (batch*text, heads, head_dim)
        flat_key = key.transpose(1, 2)[key_valid]  # (valid keys, kv_heads, head_dim)
        flat_value = value.transpose(1, 2)[key_valid]
        out = flash_varlen_function()(
            flat_query, flat_key, flat_value, cu_text, cu_keys, text, longest_keys, causal=False
        )
        return out.view(batch, text, heads, head_dim).transpose(1, 2)  # (batch, heads, text, head_dim)


def _flash_plan(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor
) -> tuple[torch.Tensor, int] | None:
    """(key_valid (batch, keys), the longest sample's key count) when flash-attn's varlen kernel computes this call
    exactly, else None. It runs on CUDA, fp16/bf16 with K/V of the query's dtype, head_dim <= 256, and masks keys
    per sample, not per query: every query row must see all of its sample's keys or none. One host
    synchronisation reads both the decision and the longest key count."""
    if query.device.type not in FLASH_DEVICE_TYPES or query.dtype not in REDUCED_PRECISION:
        return None
    if key.dtype != query.dtype or value.dtype != query.dtype or query.shape[-1] > FLASH_MAX_HEAD_DIM:
        return None
    if flash_varlen_function() is None:
        return None
    key_valid = visible.any(dim=1)  # (batch, keys): a key any query of the sample may see
    per_sample = (visible == key_valid[:, None]).all()
    exact, longest = torch.stack([per_sample.long(), key_valid.sum(-1).max()]).tolist()
    return (key_valid, longest) if exact else None


class HiveCrossAttentionBlock(KeepsFloat32):
    """`h + tanh(g_attn) * XAttn(LN(h), media)` and optionally `h + tanh(g_ffn) * FFN(LN(h))`; its own
    parameters (the gates) and its norms stay float32 whatever the model is cast to.

    Tokens that may see no image (`has_media` False, e.g. text before the first image) get exactly
    zero from both branches.
    """

    def __init__(
        self,
        attention: HiveCrossAttention,
        *,
        use_ffn: bool = False,
        ffn_mult: int = 4,
        gate_init: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        hidden_size = attention.hidden_size
        self.hive_attn_norm = HiveLayerNorm(hidden_size, eps=norm_eps)
        self.hive_media_norm = HiveLayerNorm(attention.media_size, eps=norm_eps)
        self.attn = attention
        self.hive_attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        if use_ffn:
            self.hive_ffn_norm = HiveLayerNorm(hidden_size, eps=norm_eps)
            self.hive_ffn = nn.Sequential(
                nn.Linear(hidden_size, ffn_mult * hidden_size, bias=False),
                nn.GELU(),
                nn.Linear(ffn_mult * hidden_size, hidden_size, bias=False),
            )
            self.hive_ffn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        else:
            self.hive_ffn = None

    def key_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected vision features (batch, keys, media) -> this block's K/V. Called from `forward` only:
        FSDP gathers a block's sharded parameters for its forward."""
        return self.attn.key_values(self.hive_media_norm(media))

    def forward(
        self,
        hidden: torch.Tensor,
        media: torch.Tensor | None,
        visible: torch.Tensor,
        has_media: torch.Tensor,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_weights: bool = False,
        return_key_value: bool = False,
        all_visible: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """hidden (batch, text, hidden) -> (same shape, attention weights or None, this block's K/V or None).

        media: (batch, keys, media width), projected to K/V here unless `key_value` brings them (computed once
        per prompt when generating, hence `return_key_value`); has_media: (batch, text) bool; all_visible: whether
        `visible` is all True, where the caller knows it (`HiveVisionContext.all_visible`, one sync per forward).
        """
        if key_value is None:
            key_value = self.key_values(media)
        key, value = key_value
        # A row that sees nothing attends to the keys its sample's other rows see (all keys where none does), so no
        # softmax runs over an empty row and flash-attn's per-sample key mask still fits; its update is then
        # *selected* away, not multiplied by 0: NaN x 0 is NaN, and one bad image would poison every row that sees
        # no image.
        sample_keys = visible.any(dim=1, keepdim=True)  # (batch, 1, keys)
        sample_keys = sample_keys | ~sample_keys.any(dim=-1, keepdim=True)
        safe_visible = torch.where(has_media[..., None], visible, sample_keys)
        attended, weights = self.attn(
            self.hive_attn_norm(hidden),
            key,
            value,
            safe_visible,
            return_weights=return_weights,
            all_visible=all_visible,
        )
        keep = has_media[..., None]  # (batch, text, 1)
        nothing = hidden.new_zeros(())
        update = torch.tanh(self.hive_attn_gate.float()).to(hidden.dtype) * attended.to(hidden.dtype)
        hidden = hidden + torch.where(keep, update, nothing)
        if self.hive_ffn is not None:
            fed = self.hive_ffn(self.hive_ffn_norm(hidden).to(self.hive_ffn[0].weight.dtype))
            update = torch.tanh(self.hive_ffn_gate.float()).to(hidden.dtype) * fed.to(hidden.dtype)
            hidden = hidden + torch.where(keep, update, nothing)
        if weights is not None:  # (batch, heads, text, keys): a row that sees no image attended to nothing
            weights = torch.where(has_media[:, None, :, None], weights, weights.new_zeros(()))
        return hidden, weights, key_value if return_key_value else None
