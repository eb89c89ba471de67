"""lmms-eval model `hive`: HIVE checkpoints, HIVE adapters and LLaVA-repo checkpoints in lmms-eval 0.7.

    lmms-eval --model hive --model_args pretrained=run/stage3 --tasks mme ...
    lmms-eval --model hive --model_args pretrained=llava-hf/llava-1.5-7b-hf,adapter=adapter/ --tasks mme ...
    lmms-eval --model hive --model_args pretrained=checkpoints/llava-hive,conv_mode=vicuna_v1 --tasks mme ...

Registered through the `lmms_eval.models` entry point of this package (see `plugin.py`); lmms-eval
imports this module only when the model is used. `model_args`:

- `pretrained`: a HIVE checkpoint, the base of `adapter`, or a LLaVA-repo checkpoint (found by its
  `mm_vision_tower` config entry; any `--vision_connector`, LLaVA's own `mlp` included);
- `adapter`: a HIVE adapter directory on `pretrained`; `model_base`: LLaVA's `--model-base` (LoRA);
- `device` (`cpu`, `cuda`, ...), `dtype` (`float32`, `bfloat16`, `float16`; HIVE checkpoints),
  `batch_size`, `max_new_tokens` (when the task sets none), `prompt_format` (`auto`, `plain`, `chat`;
  HIVE checkpoints), `conv_mode` (LLaVA checkpoints, default `vicuna_v1`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from ..model.loading import load_hive
from ..utils.console import on_a_terminal
from .backends import GenerationSettings, HiveBackend, LlavaBackend


def is_llava_checkpoint(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and "mm_vision_tower" in json.loads(config.read_text())


class HiveLmms(lmms):
    """See the module docstring."""

    def __init__(
        self,
        pretrained: str,
        adapter: str | None = None,
        model_base: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        batch_size: int = 1,
        max_new_tokens: int = 128,
        prompt_format: str = "auto",
        conv_mode: str = "vicuna_v1",
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"hive model: unknown model_args {sorted(unknown)}; see `hive_adapter.evaluation.lmms_model`"
            )
        self.batch_size_per_device = int(batch_size)
        if self.batch_size_per_device < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.max_new_tokens = int(max_new_tokens)
        if is_llava_checkpoint(pretrained):
            if adapter is not None:
                raise ValueError(f"{pretrained} is a LLaVA-repo checkpoint; `adapter` is for HIVE adapters on HF bases")
            self.backend = LlavaBackend(pretrained, model_base=model_base, conv_mode=conv_mode, device=device)
        else:
            loaded = load_hive(pretrained, adapter=adapter, device=device, dtype=dtype)
            self.backend = HiveBackend(loaded, prompt_format=prompt_format)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def _quiet(self) -> bool:
        """No progress bar: another rank than 0, or no terminal to draw it on."""
        return self.rank != 0 or not on_a_terminal()

    def _doc_images(self, request_args) -> list:
        doc_to_visual, doc_id, task, split = request_args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if any(not hasattr(visual, "convert") for visual in visuals):
            raise ValueError(f"{task} doc {doc_id}: the hive model reads images only (got {type(visuals[0]).__name__})")
        return list(visuals)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled) answers, batched: same generation settings and image count per batch.

        Images are counted up front and decoded again per batch, so a benchmark's pictures are never
        all held in memory at once.
        """
        arguments = [request.args for request in requests]

        def group(index: int) -> tuple[str, int]:
            settings = json.dumps(arguments[index][1], sort_keys=True, default=str)
            return settings, len(self._doc_images(arguments[index][2:6]))

        groups = {index: group(index) for index in range(len(arguments))}
        answers: list[str | None] = [None] * len(arguments)
        progress = tqdm(total=len(arguments), disable=self._quiet, desc="hive: generating")
        batch: list[int] = []

        def flush() -> None:
            settings = GenerationSettings.from_task(arguments[batch[0]][1], default_max_new_tokens=self.max_new_tokens)
            images = [self._doc_images(arguments[index][2:6]) for index in batch]
            outputs = self.backend.generate([arguments[index][0] for index in batch], images, settings)
            for index, text in zip(batch, outputs, strict=True):
                answers[index] = text
                self.cache_hook.add_partial("generate_until", (arguments[index][0], arguments[index][1]), text)
            progress.update(len(batch))
            batch.clear()

        for index in sorted(groups, key=groups.get):
            if batch and (groups[batch[0]] != groups[index] or len(batch) == self.batch_size):
                flush()
            batch.append(index)
        if batch:
            flush()
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding would produce it)."""
        results = []
        for request in tqdm(requests, disable=self._quiet, desc="hive: log-likelihood"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            results.append(
                self.backend.loglikelihood(
                    context, continuation, self._doc_images((doc_to_visual, doc_id, task, split))
                )
            )
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        """Rounds driven by the task's `doc_to_text(doc, previous_output=..., round_idx=...)` until it signals the end."""
        results = []
        for request in tqdm(requests, disable=self._quiet, desc="hive: multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            settings = GenerationSettings.from_task(gen_kwargs, default_max_new_tokens=self.max_new_tokens)
            visuals = self._doc_images((doc_to_visual, doc_id, task, split))
            outputs: list[str] = []
            round_info = None
            round_index = 0
            while True:
                if round_index > 0:
                    visuals, context, finished, _, round_info = doc_to_text(
                        doc, previous_output=outputs, round_idx=round_index, previous_round_info=round_info
                    )
                    if finished:
                        break
                    visuals = list(visuals or [])
                outputs.append(self.backend.generate([context], [visuals], settings)[0])
                round_index += 1
            results.append(outputs)
        return results
