"""What dtype HIVE's numerically sensitive parameters (gates, norms) really hold, after `.to(bf16)` and after a
DeepSpeed ZeRO-2 bf16 initialisation, and where their float32 master copy lives (docs/ARCHITECTURE.md §5).

DeepSpeed 0.19.8 casts every parameter with `p.data = p.data.to(bf16)` (`engine._cast_module_mixed_precision`),
never through `module.bfloat16()`, so `KeepsFloat32` does not run, and its `keep_in_fp32_modules` keeps buffers
only: under DeepSpeed bf16 the gates and norms are bf16 in the module. Their float32 master copy is the ZeRO
optimizer's partition (`single_partition_of_fp32_groups`), which is what the optimizer steps; the forward upcasts
both (`tanh(gate.float())`, `HiveLayerNorm` in float32).

    PYTHONPATH=. python -m benchmarks.dtype_audit --device cpu      # one process, world size 1 (gloo / nccl)
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from hive_adapter.utils.flags import FullFlagParser

SENSITIVE = ("hive_attn_gate", "hive_ffn_gate", "hive_attn_norm", "hive_media_norm", "hive_ffn_norm")


def sensitive_dtypes(model: nn.Module) -> dict[str, str]:
    """name -> dtype of every HIVE gate and norm parameter."""
    return {
        name: str(param.dtype).replace("torch.", "")
        for name, param in model.named_parameters()
        if any(part in name for part in SENSITIVE)
    }


def deepspeed_zero2_bf16(device: str, *, gate: float = 0.1234567, learning_rate: float = 1e-5) -> dict:
    """A tiny HIVE model at stage 2 (HIVE + LLM train) under DeepSpeed ZeRO-2 bf16 (one rank): the dtypes the module
    holds after `deepspeed.initialize`, the ZeRO flat groups, the float32 master copy of a gate set to `gate`
    (not a bf16 number), and one training step."""
    import deepspeed
    import torch.distributed as dist

    from .configs import TINY
    from .models import build, set_stage, training_batch

    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29617"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(0)
    model = build(TINY, "hive", device=device)
    set_stage(model, "hive", 2)
    first_gate = next(p for n, p in model.named_parameters() if n.endswith("hive_attn_gate"))
    with torch.no_grad():
        first_gate.fill_(gate)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": learning_rate, "torch_adam": True}},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    module = engine.module
    after_init = {
        "gates_and_norms": sorted(set(sensitive_dtypes(module).values())),
        "other_trainable": _dtypes(p for n, p in module.named_parameters() if p.requires_grad and not _sensitive(n)),
        "frozen": _dtypes(p for p in module.parameters() if not p.requires_grad),
        "zero_flat_groups": _dtypes(optimizer.bit16_groups_flat),
        "gate_set": gate,
        "gate_in_module": float(first_gate.detach().float()),
        "gate_master_copy": float(_master_copy(optimizer, first_gate)),
    }
    inputs = training_batch(TINY, "hive", batch=2, text_tokens=16, device=engine.device, dtype=torch.bfloat16)
    loss = engine(**inputs).loss
    engine.backward(loss)
    engine.step()
    return {
        "after_init": after_init,
        "step": {
            "loss": float(loss),
            "loss_finite": bool(torch.isfinite(loss)),
            "gate_in_module": float(first_gate.detach().float()),
            "gate_master_copy": float(_master_copy(optimizer, first_gate)),
        },
    }


def _sensitive(name: str) -> bool:
    return any(part in name for part in SENSITIVE)


def _dtypes(tensors) -> list[str]:
    return sorted({str(t.dtype).replace("torch.", "") for t in tensors})


def _master_copy(optimizer, param: torch.Tensor) -> torch.Tensor:
    """The float32 master value of a one-element parameter in a one-rank ZeRO-1/2 optimizer."""
    for group, fp32 in zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups, strict=True):
        offset = 0
        for candidate in group:
            if candidate is param:
                return fp32.detach()[offset : offset + candidate.numel()].clone()
            offset += candidate.numel()
    raise LookupError("the parameter is in no ZeRO parameter group")


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(prog="benchmarks.dtype_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps({"deepspeed_zero2_bf16": deepspeed_zero2_bf16(args.device)}))


if __name__ == "__main__":
    main()
