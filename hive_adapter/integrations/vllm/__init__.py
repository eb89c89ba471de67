"""HIVE on vLLM: an out-of-tree model plugin (`vllm.general_plugins` entry point `hive`).

vLLM loads every `vllm.general_plugins` entry point in each of its processes; `register` makes a checkpoint whose
`config.json` says `"architectures": ["HiveForConditionalGeneration"]` (what `hive-train` and `save_pretrained`
write) load through `LLM(model=DIR)` and `vllm serve DIR`. vLLM is imported only inside this package.

How HIVE maps onto vLLM (docs/guides/vllm.md, "Serve at scale: vLLM"):

- the language model's decoder layers are vLLM's own (`LlamaForCausalLM`, ...); HIVE's gated cross-attention
  blocks run between them, at the decoder layers the checkpoint names;
- the images are the *encoder input* of vLLM's encoder-decoder path: `embed_multimodal` runs the vision tower once
  per request and returns each image's projected levels; every HIVE block writes the K/V of its own level into
  its own paged cross-attention cache on the prompt's step, and decoding steps read them back from there.
"""

from __future__ import annotations

ARCHITECTURE = "HiveForConditionalGeneration"


def register() -> None:
    """Register HIVE's architecture and its config with vLLM (called by vLLM in each process)."""
    from vllm import ModelRegistry

    from .config import register_config

    register_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "hive_adapter.integrations.vllm.model:HiveForConditionalGeneration")
