"""LLaVA's `train_mem.py` (flash-attention 2), HIVE-enabled: `deepspeed hive_adapter/integrations/llava/train_mem.py ...`."""

from __future__ import annotations

from hive_adapter.integrations.llava.train import cli

if __name__ == "__main__":
    cli(attn_implementation="flash_attention_2")
