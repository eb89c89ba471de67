"""What `hive-reproduce` measures on each connector's checkpoints, beyond image reading and the probes:
how far stage 3 moved the encoder, the caption loss's gradient into every encoder layer, each
cross-attention block's entropy and gate, and the FLOPs and time of one training step.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.synthetic import PROMPT, SyntheticShapes
from ..model.loading import load_hive
from .attention import attention_entropy
from .captioning import caption_batch
from .gradients import gradient_flow
from .probe import load_frozen_encoder


def encoder_change(before: Path, after: Path) -> float:
    """Relative L2 change of the vision encoder's weights between two checkpoints (how far stage 3 moved it)."""
    first, second = load_frozen_encoder(before)[0].state_dict(), load_frozen_encoder(after)[0].state_dict()
    moved = sum(float((second[name].float() - tensor.float()).pow(2).sum()) for name, tensor in first.items())
    size = sum(float(tensor.float().pow(2).sum()) for tensor in first.values())
    return (moved / size) ** 0.5


def held_out_batch(loaded, held_out: SyntheticShapes, count: int) -> dict[str, torch.Tensor]:
    indices = range(min(count, len(held_out)))
    return caption_batch(
        loaded, [held_out.image(i) for i in indices], [held_out.caption(i) for i in indices], prompt=PROMPT
    )


def gradient_profile(checkpoint: Path, held_out: SyntheticShapes, count: int) -> dict:
    """Per-layer gradient norms (raw, and relative to the text input's) and object share, mean over `count`
    held-out pairs, plus sample 0's maps."""
    loaded = load_hive(checkpoint)
    flow = gradient_flow(loaded.model, held_out_batch(loaded, held_out, count))
    masks = torch.stack(
        [torch.from_numpy(np.array(held_out.object_mask(i), dtype=np.float32) / 255) for i in range(len(flow.losses))]
    )
    return {
        "grad_norm": flow.layer_norms.mean(0).tolist(),
        "relative_grad_norm": flow.relative_norms.mean(0).tolist(),
        "text_input_grad_norm": float(flow.text_input_norms.mean()),
        "object_share": flow.object_share(masks).mean(0).tolist(),
        "object_area": float(masks.mean()),
        "sample_maps": flow.patch_maps[0],
        "sample_norms": flow.layer_norms[0].tolist(),
    }


def cross_attention_profile(checkpoint: Path, held_out: SyntheticShapes, count: int) -> dict:
    """Attention entropy per block (nats, over `count` held-out pairs), its uniform maximum and tanh(gate) per block."""
    loaded = load_hive(checkpoint)
    entropy = attention_entropy(loaded.model, held_out_batch(loaded, held_out, count))
    gates = [
        math.tanh(param.item()) for name, param in loaded.model.named_parameters() if name.endswith("hive_attn_gate")
    ]
    config, shape = loaded.model.hive_config, loaded.model.hive_vision_shape
    keys = config.tokens_per_level or (shape.image_size // shape.patch_size) ** 2  # one level per block ("paired")
    return {"attention_entropy": entropy.tolist(), "uniform_entropy": math.log(keys), "tanh_gate": gates}


def step_costs(stage0: dict[str, Path], sample_batch: dict, rounds: int = 5) -> dict[str, dict]:
    """FLOPs (counted; in total and without the vision tower's share) and median seconds of one
    forward+backward with every parameter training (stage 3)."""
    models = {}
    for connector, path in stage0.items():
        model = load_hive(path).model.train()
        model.requires_grad_(True)
        models[connector] = model
    out = {}
    for connector, model in models.items():
        with FlopCounterMode(display=False) as counter:
            model(**sample_batch).loss.backward()
        model.zero_grad(set_to_none=True)
        tower = sum(counter.get_flop_counts().get(f"{type(model).__name__}.vision_model", {}).values())
        total = counter.get_total_flops()
        out[connector] = {"gflops": total / 1e9, "gflops_without_tower": (total - tower) / 1e9, "times": []}
    for _ in range(rounds):  # interleaved, so machine noise hits every connector alike
        for connector, model in models.items():
            started = time.perf_counter()
            model(**sample_batch).loss.backward()
            out[connector]["times"].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    for connector in out:
        out[connector]["ms"] = 1000 * statistics.median(out[connector].pop("times"))
    return out
