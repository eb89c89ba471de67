"""Packed sequences: several samples in one row, told apart by their position ids (docs/ARCHITECTURE.md §8).

The representation is transformers' own (TRL's padding-free batches, `DataCollatorWithFlattening`): a row holds
samples back to back, `position_ids` restart at 0 where a sample starts, and `attention_mask` is None. From
that, transformers (`masking_utils`, 5.x) builds a block-diagonal causal mask for SDPA / eager / flex attention.
Flash-attention takes no mask, and transformers finds packed samples from position ids only in a batch of one row;
for several packed rows HIVE hands the language model the sample boundaries itself (`flash_packing_kwargs`: the
`cu_seq_lens_q/k`, `max_length_q/k` of `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`), so its
varlen kernel keeps each sample to itself. HIVE reads the same restarts as per-token segment ids, so that a token's
cross-attention sees only the images of its own sample (`context.HiveVisionContext.visibility`). A batch is
packed exactly when transformers would treat it so: position ids that restart, no attention mask, no cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:  # transformers >= 4.54: packed sequences are detected from restarting position ids
    from transformers.masking_utils import find_packed_sequence_indices as _transformers_segments
except ImportError:  # pragma: no cover - older transformers (4.37 in the LLaVA environment)
    _transformers_segments = None

# The language model's attention implementations whose masks transformers builds from packed position ids.
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def packed_segments(
    position_ids: torch.Tensor | None, *, attention_mask: torch.Tensor | None, past_key_values: Any
) -> torch.Tensor | None:
    """(batch, text) the sample each token belongs to (0, 1, ... along each row), or None when the batch is not
    packed: no position ids, an attention mask or a cache given (transformers' rule), or no row that restarts."""
    if position_ids is None or attention_mask is not None or past_key_values is not None:
        return None
    if position_ids.device.type == "meta" or position_ids.ndim != 2:
        return None
    if _transformers_segments is not None:
        return _transformers_segments(position_ids)
    diff = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)  # the same rule, for the refusal
    segments = (diff != 1).cumsum(-1)
    return None if bool((segments[:, -1] == 0).all()) else segments


def check_packed_language_model(language_model: torch.nn.Module, kwargs: dict) -> None:
    """Refuse a packed batch the language model would not keep apart (its self-attention would mix samples), and
    turn its cache off (a cache hides the packing from transformers' mask builder)."""
    if _transformers_segments is None:
        import transformers

        raise ValueError(
            f"a packed batch (position_ids restarting inside a row, no attention_mask): transformers "
            f"{transformers.__version__} builds no block-diagonal mask from position ids, so samples would attend to "
            "each other; upgrade transformers (>= 4.54) or pad the batch instead"
        )
    implementation = getattr(getattr(language_model, "config", None), "_attn_implementation", None)
    if implementation is not None and implementation not in PACKED_ATTENTION:
        raise ValueError(
            f"a packed batch with attn_implementation={implementation!r}: transformers keeps packed samples apart "
            f"only for {', '.join(PACKED_ATTENTION)}; load the model with one of them or pad the batch instead"
        )
    if kwargs.get("use_cache"):
        raise ValueError(
            "use_cache=True with a packed batch (position_ids restarting inside a row): a cache makes transformers "
            "ignore the packing, so samples would attend to each other; packing is for training, pass use_cache=False"
        )
    kwargs["use_cache"] = False


def flash_packing_kwargs(language_model: torch.nn.Module, position_ids: torch.Tensor) -> dict[str, Any]:
    """For a flash-attention language model: the boundaries of the packed samples over the flattened rows (the
    keyword arguments transformers' flash path reads before it looks at position ids); {} for other kernels.

    position_ids (rows, text): each row starts a sample, and so does every column whose position id does not
    continue the previous one (transformers' restart rule)."""
    implementation = getattr(getattr(language_model, "config", None), "_attn_implementation", None) or ""
    if not implementation.startswith("flash_attention"):
        return {}
    rows, text = position_ids.shape
    starts = torch.ones(rows, text, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (rows, text): a sample starts here
    first = starts.flatten().nonzero().flatten()  # (samples,) flat column where each sample starts
    end = torch.tensor([rows * text], device=position_ids.device)
    cu_seq_lens = torch.cat([first, end]).to(torch.int32)  # (samples + 1,)
    longest = int(cu_seq_lens.diff().max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def refuse_packed_generation(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
    """`generate` continues whole prompts: a packed batch (several prompts in one row) is refused by name."""
    if packed_segments(position_ids, attention_mask=attention_mask, past_key_values=None) is not None:
        raise ValueError(
            "generate() got a packed batch (position_ids restarting inside a row): packed sequences are a "
            "training-time feature; give one prompt per row (padded, with an attention_mask)"
        )


@dataclass(frozen=True)
class PackedLayout:
    """Where each sample of packed rows stands, both ways. Samples are numbered row-major (row 0's first
    sample is 0). `row`, `column`, `valid`: (samples, width), the row and column of each sample's position
    (`width` is the longest sample; `valid` False past a sample's end); `sample`, `offset`: (rows, text), the
    sample and position within it of each column (every column belongs to a sample: a row's padding continues
    its last one)."""

    row: torch.Tensor
    column: torch.Tensor
    valid: torch.Tensor
    sample: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def from_segments(cls, segments: torch.Tensor) -> PackedLayout:
        rows, length = segments.shape
        device = segments.device
        counts = segments[:, -1] + 1  # (rows,) samples per row
        first = counts.cumsum(0) - counts
        sample = first[:, None] + segments  # (rows, text)
        columns = torch.arange(length, device=device).expand(rows, length)
        total = int(counts.sum())
        starts = torch.full((total,), length, dtype=torch.long, device=device)
        starts = starts.scatter_reduce(0, sample.flatten(), columns.flatten(), reduce="amin")
        offset = columns - starts[sample]
        lengths = torch.bincount(sample.flatten(), minlength=total)
        width = int(lengths.max())
        row = torch.zeros(total, width, dtype=torch.long, device=device)
        column = torch.zeros(total, width, dtype=torch.long, device=device)
        valid = torch.zeros(total, width, dtype=torch.bool, device=device)
        row[sample, offset] = torch.arange(rows, device=device)[:, None].expand(rows, length)
        column[sample, offset] = columns
        valid[sample, offset] = True
        return cls(row, column, valid, sample, offset)

    @property
    def samples(self) -> int:
        return self.row.shape[0]

    @property
    def width(self) -> int:
        return self.row.shape[1]

    def gather(self, packed: torch.Tensor) -> torch.Tensor:
        """(rows, text, ...) -> (samples, width, ...): each sample's positions in a row of its own (positions
        past its end repeat column 0 of row 0; mask them with `valid`)."""
        return packed[self.row, self.column]

    def scatter(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(samples, width, ...) -> (rows, text, ...): the inverse of `gather` (every column is some sample's)."""
        return per_sample[self.sample, self.offset]
