"""A family at its real published size, on `meta` (no weights): HIVE wraps it and says its default levels (issue 37).

Qwen2.5-VL-7B-Instruct's config.json (model card: 8.29B parameters), typed in: the parameter count below is the
check that the numbers are the published model's. The other families' real sizes and the FLOPs of HIVE vs each
family's own connector are still to be added (README, "The VLM families it wraps").
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import hive_adapter as hive

QWEN2_5_VL_7B = Qwen2_5_VLConfig(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
)  # fmt: skip


def test_qwen2_5_vl_7b_wraps_on_meta_with_its_default_levels():
    with torch.device("meta"):
        base = Qwen2_5_VLForConditionalGeneration(QWEN2_5_VL_7B)
    assert sum(p.numel() for p in base.parameters()) == 8_292_166_656  # the model card's 8.29B
    model = hive.get_hive_model(base)
    layers = model.hive_layers
    print(f"Qwen2.5-VL-7B: vision levels {layers.vision_layers} -> decoder layers {layers.llm_layers}")
    assert layers.vision_layers == (3, 7, 11, 15, 19, 23, 27, 31)  # 25% of 32 ViT blocks, ending at the last
    assert layers.llm_layers == (0, 3, 7, 10, 14, 17, 21, 24)
    assert model.hive_vision.reader.name == "qwen-packed-patches"
    assert model.hive_vision_shape.hidden_size == 1280 and model.hive_text_shape.hidden_size == 3584
    assert all(p.device.type == "meta" for _, p in model.hive_named_parameters())
