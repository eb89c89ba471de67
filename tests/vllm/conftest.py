"""The vLLM world's fixtures (requirements/vllm.txt, `make test-vllm`): tiny servable HIVE checkpoints and what
transformers' `generate` answers for them, the reference every vLLM answer must equal."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# vLLM's CPU backend reserves its KV cache up front (4 GiB by default); the toys need a few MiB.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

NEW_TOKENS = 8


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    from checkpoints import toy_models

    return toy_models(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def marker_model(toy, tmp_path_factory):
    from checkpoints import save_servable_checkpoint

    return save_servable_checkpoint(toy, tmp_path_factory.mktemp("marker"), marker=True)


@pytest.fixture(scope="session")
def caption_model(toy, tmp_path_factory):
    from checkpoints import save_servable_checkpoint

    return save_servable_checkpoint(toy, tmp_path_factory.mktemp("caption"), marker=False)


class Reference:
    """transformers' greedy `generate` on a saved HIVE model, float32 on CPU, through its saved processor."""

    def __init__(self, directory: Path):
        import hive_adapter as hive

        # The classes themselves, not the Auto ones: in a process that started vLLM, AutoConfig builds
        # model_type "hive" with the plugin's encoder-decoder flag, which transformers' generate must not see.
        config = hive.HiveConfig.from_pretrained(directory)
        self.model = hive.HiveForConditionalGeneration.from_pretrained(directory, config=config).eval()
        self.processor = hive.HiveProcessor.from_pretrained(directory)

    def prompt(self, text: str, images: list | None = None) -> dict:
        parts = [{"type": "image"} for _ in images or []] + [{"type": "text", "text": text}]
        chat = self.processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        return self.processor(text=chat, images=images or None, return_tensors="pt")

    def token_ids(self, text: str, images: list | None = None) -> list[int]:
        return self.prompt(text, images)["input_ids"][0].tolist()

    def chat(self, messages: list[dict], new_tokens: int = NEW_TOKENS) -> str:
        """The decoded answer to chat `messages` (parts `{"type": "image", "image": PIL image}`), tokenized as a
        server renders a chat: the template's text, its special tokens as written."""
        import torch

        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return self.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def answer(self, text: str, images: list | None = None, new_tokens: int = NEW_TOKENS) -> list[int]:
        import torch

        inputs = self.prompt(text, images)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="session")
def marker_reference(marker_model):
    return Reference(marker_model)


@pytest.fixture(scope="session")
def caption_reference(caption_model):
    return Reference(caption_model)
