"""What DeepSpeed's bf16 engine does to HIVE's gates and norms (issue 42, finding 2), through DeepSpeed 0.19.8's own
initialisation (one rank, gloo) and one ZeRO-2 step: `benchmarks/dtype_audit.py`, which `make gpu-check` runs on
one GPU too."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.serving import free_port
from hive_adapter.model.cross_attention import HiveCrossAttention, HiveCrossAttentionBlock

pytest.importorskip("deepspeed")


def test_deepspeed_bf16_keeps_the_model_bf16_with_a_float32_master_copy_of_the_gates():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.dtype_audit", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    audit = json.loads(result.stdout.strip().splitlines()[-1])["deepspeed_zero2_bf16"]
    init, step = audit["after_init"], audit["step"]
    # DeepSpeed casts every p.data to bf16 and then moves the module: the gates and norms must not turn back to
    # float32 there, or ZeRO's flat group (one concatenated buffer) becomes float32 and every trainable weight of
    # the model with it (before: other_trainable and zero_flat_groups were float32).
    assert init["zero_flat_groups"] == ["bfloat16"] and init["other_trainable"] == ["bfloat16"], init
    assert init["gates_and_norms"] == ["bfloat16"] and init["frozen"] == ["bfloat16"], init
    rounded = float(torch.tensor(init["gate_set"]).bfloat16().float())
    assert init["gate_in_module"] == init["gate_master_copy"] == rounded  # DeepSpeed builds the master from bf16
    # One AdamW step of lr 1e-5: the float32 master copy moves by about the rate, the bf16 copy the forward reads
    # is the master rounded to bf16.
    assert step["loss_finite"]
    assert 1e-6 < abs(step["gate_master_copy"] - init["gate_master_copy"]) < 1e-4, step
    assert step["gate_in_module"] == float(torch.tensor(step["gate_master_copy"]).bfloat16().float())


def test_only_a_cast_made_by_the_module_call_is_undone():
    attention = HiveCrossAttention(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4)
    block = HiveCrossAttentionBlock(attention, use_ffn=True)
    block.to(torch.bfloat16)
    assert block.hive_attn_gate.dtype == block.hive_attn_norm.weight.dtype == torch.float32
    assert block.attn.hive_q_proj.weight.dtype == torch.bfloat16
    for param in block.parameters():  # what DeepSpeed's engine does, then `module.to(device)`
        param.data = param.data.to(torch.bfloat16)
    block.to("cpu")
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
