"""`python -m hive_adapter.integrations.llava.train`: LLaVA's `llava/train/train.py`, HIVE-enabled.

Takes every flag LLaVA's training script takes, plus `--vision_connector hive` and the `--hive_*`
options (`--hive_vision_layers 5,11,17,23`, `--hive_llm_layers`, `--hive_tokens_per_level`,
`--hive_level_mapping`, ...) and `--unfreeze_vision_tower` for stage 3. Runs on CPU and GPU with the
model's default attention; `train_mem` is the flash-attention twin, as in LLaVA.
"""

from __future__ import annotations

import logging


def main(attn_implementation: str | None = None) -> None:
    from hive_adapter.integrations.llava.patch import apply_patch

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    apply_patch()
    from llava.train.train import train

    train(attn_implementation=attn_implementation)


if __name__ == "__main__":
    main()
