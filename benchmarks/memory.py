"""Peak training memory the way the paper reports it (supplementary Table 9: peak GPU memory during
training, 54.2 -> 22.03 GB), counted on `meta` at the full shapes: no weights, no GPU.

One GPU, no sharding, bf16 mixed precision with AdamW, the standard accounting (ZeRO paper, §3):
- every parameter in bf16 for forward and backward: 2 bytes;
- per trainable parameter: its bf16 gradient (2 bytes), the fp32 master copy and AdamW's two moments
  (12 bytes): 14 bytes more;
- activations: the bytes autograd saves for backward in one bf16 training forward (`saved_tensors_hooks`),
  per sample, times the per-device batch.
Not counted: temporary workspace, the allocator's fragmentation, the vision tower's frozen forward
intermediates (freed as they go). So this is a lower bound on a measured peak; ratios are what compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .configs import TEXT_TOKENS, ModelPair
from .measure import saved_activation_bytes
from .models import build, set_stage

WEIGHT_BYTES = 2  # bf16
GRADIENT_BYTES = 2  # bf16
OPTIMIZER_BYTES = 12  # fp32 master copy, AdamW m and v
TRAINABLE_EXTRA_BYTES = GRADIENT_BYTES + OPTIMIZER_BYTES


@dataclass
class TrainingMemory:
    mode: str
    stage: int
    parameters: int
    trainable: int
    activation_bytes_per_sample: int

    @property
    def state_bytes(self) -> int:
        """Weights, gradients and optimizer state: independent of the batch."""
        return WEIGHT_BYTES * self.parameters + TRAINABLE_EXTRA_BYTES * self.trainable

    def peak_bytes(self, batch: int) -> int:
        return self.state_bytes + batch * self.activation_bytes_per_sample

    def as_dict(self, batches: tuple[int, ...]) -> dict:
        return {
            **asdict(self),
            "state_bytes": self.state_bytes,
            "peak_bytes": {str(batch): self.peak_bytes(batch) for batch in batches},
        }


def training_memory(pair: ModelPair, mode: str, *, stage: int, text_tokens: int = TEXT_TOKENS) -> TrainingMemory:
    model = build(pair, mode, device="meta")
    set_stage(model, mode, stage)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    activations = saved_activation_bytes(
        pair, mode, stage=stage, batch=1, text_tokens=text_tokens, device="meta", dtype=torch.bfloat16
    )
    return TrainingMemory(mode, stage, parameters, trainable, activations)
