"""Model shapes the benchmarks build: the paper's two scales (weights never needed) and a CPU-sized pair."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import CLIPVisionConfig, LlamaConfig, SiglipVisionConfig


@dataclass(frozen=True)
class ModelPair:
    """A vision tower and a Llama-shaped LLM, by their config fields."""

    name: str
    vision_kind: str  # "siglip" | "clip"
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    hive_layers: dict = field(default_factory=dict)  # vision_layers / llm_layers when not HIVE's default spread

    def vision_config(self, image_size: int | None = None):
        fields = dict(self.vision)
        if image_size is not None:
            fields["image_size"] = image_size
        config = (SiglipVisionConfig if self.vision_kind == "siglip" else CLIPVisionConfig)(**fields)
        config._attn_implementation = "sdpa"
        return config

    def text_config(self) -> LlamaConfig:
        config = LlamaConfig(**self.text)
        config._attn_implementation = "sdpa"
        return config

    def vision_tokens(self, image_size: int | None = None) -> int:
        side = (image_size or self.vision["image_size"]) // self.vision["patch_size"]
        return side * side


# LLaVA-1B class: SigLIP-so400m/14@384 (27 layers, 729 patches) + TinyLlama-1.1B.
PAPER_1B = ModelPair(
    name="1B (SigLIP-so400m/14@384 + TinyLlama-1.1B)",
    vision_kind="siglip",
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14),
    text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
)  # fmt: skip

# LLaVA-1.5-7B shaped: CLIP-L/14@336 (24 layers, 576 patches) + Vicuna-7B.
PAPER_7B = ModelPair(
    name="7B (CLIP-L/14@336 + Vicuna-7B)",
    vision_kind="clip",
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768),
    text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
)  # fmt: skip

# The 1B widths with 2 + 2 layers (HIVE on both LLM layers): the paper's per-layer proportions (tower width
# 1152 over 729 patches, LLM width 2048, vocabulary 32000) at a depth a CPU can time.
PAPER_1B_SHALLOW = ModelPair(
    name="1B widths, 2 + 2 layers (SigLIP-so400m/14@384 and TinyLlama-1.1B layers)",
    vision_kind="siglip",
    vision={**PAPER_1B.vision, "num_hidden_layers": 2},
    text={**PAPER_1B.text, "num_hidden_layers": 2},
    hive_layers=dict(vision_layers=[0, 1], llm_layers=[0, 1]),
)

# Small enough for real CPU timing, same proportions of layers (8 vision layers -> 2 levels).
CPU_SMALL = ModelPair(
    name="CPU-small (SigLIP 8x256 @224/14 + Llama 8x512)",
    vision_kind="siglip",
    vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                image_size=224, patch_size=14),
    text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096),
)  # fmt: skip

# For the harness test.
TINY = ModelPair(
    name="tiny",
    vision_kind="siglip",
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                image_size=64, patch_size=8),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024),
)  # fmt: skip

TEXT_TOKENS = 77  # the paper's pre-training text length
IMAGE_TOKEN_ID = 5
