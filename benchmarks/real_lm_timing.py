"""Where a training step's time goes with the real LM (`python -m benchmarks.real_lm --time_breakdown`): the
vision tower, HIVE's modules, the 49k-way output layer and loss, the optimiser step and the decoder layers, timed
on one batch of each stage for each connector; nothing trains (`benchmarks.real_lm`)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from hive_adapter.data.synthetic import SyntheticShapes

from .real_lm_settings import IMAGE_SIZE, LLM_LAYERS, STAGES, TOKENS_PER_LEVEL, VISION_LAYERS, say

BREAKDOWN_PARTS = ("vision tower (forward, frozen)", "HIVE modules (forward)", "output layer + loss (49k-way)",
                   "optimiser step", "decoder layers and the rest")  # fmt: skip


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up: first-call allocations and kernel choices
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class _ForwardClock:
    """Seconds spent inside the forward of some modules (hooks; CPU work is synchronous, so wall time is theirs)."""

    def __init__(self, modules) -> None:
        self.seconds, self._starts = 0.0, {}
        self._hooks = []
        for module in modules:
            self._hooks.append(module.register_forward_pre_hook(self._enter))
            self._hooks.append(module.register_forward_hook(self._leave))

    def _enter(self, module, *_) -> None:
        self._starts[id(module)] = time.perf_counter()

    def _leave(self, module, *_) -> None:
        self.seconds += time.perf_counter() - self._starts.pop(id(module))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _time_stage(model, batch: dict, *, stage: int, repeats: int, hive_clock: _ForwardClock) -> tuple[float, dict]:
    """Seconds per training step of `stage` and its parts (see `time_breakdown`)."""
    from hive_adapter.model.parameters import is_hive_parameter

    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_hive_parameter(name) or (stage == 2 and name.startswith("language_model.")))
    optimiser = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    record: dict[str, float] = {}

    def step() -> None:
        hive_clock.seconds = 0.0
        model(**batch).loss.backward()
        started = time.perf_counter()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        record["optimiser"], record["hive"] = time.perf_counter() - started, hive_clock.seconds

    step_seconds = _median_seconds(step, repeats)  # `record` holds the last repeat's parts
    with torch.no_grad():
        vision = _median_seconds(
            lambda: model.vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True), repeats
        )
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # (batch, [image +] text, width)
    labels = batch["labels"]
    hidden = hidden[:, -labels.shape[1] :]  # concat's image tokens stand in front of the text; the loss reads text
    head = model.get_output_embeddings()

    def output_layer() -> None:
        logits = head(hidden.clone().requires_grad_(True))  # (batch, text, vocabulary)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        loss.backward()
        head.weight.grad = None

    parts = {
        BREAKDOWN_PARTS[0]: vision,
        BREAKDOWN_PARTS[1]: record["hive"],
        BREAKDOWN_PARTS[2]: _median_seconds(output_layer, repeats),
        BREAKDOWN_PARTS[3]: record["optimiser"],
    }
    parts[BREAKDOWN_PARTS[4]] = step_seconds - sum(parts.values())
    return step_seconds, parts


def time_breakdown(language: Path, *, batch_size: int, repeats: int, connectors: list[str]) -> dict:
    """One training step of stage 1 and of stage 2 per connector, split into parts, each timed on its own.

    The model is composed fresh (timing does not depend on what it learned): the toy SigLIP around SmolLM2 with
    the study's levels; the batch is the study's (16 synthetic captions after the prompt). The step is timed
    whole; its parts separately (median of `repeats`): the vision tower's forward alone; HIVE's modules' forward
    (hooks around them inside the step); the output layer with the loss, forward and backward on the step's final
    hidden states (with the weight's gradient when the LM trains); the optimiser step (AdamW over what trains).
    What is left is the decoder layers' forward and backward and everything else."""
    import tempfile

    from transformers import AutoImageProcessor, AutoTokenizer, LlamaForCausalLM, SiglipVisionModel

    import hive_adapter as hive
    from hive_adapter.data.collator import HiveCaptionCollator
    from hive_adapter.data.synthetic import caption_vocabulary
    from hive_adapter.tools.toy_models import write_toy_models

    tokenizer = AutoTokenizer.from_pretrained(language)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    results: dict = {"batch_size": batch_size, "repeats": repeats, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        vision_dir, _ = write_toy_models(Path(tmp) / "toy", caption_vocabulary())
        collator = HiveCaptionCollator(tokenizer, AutoImageProcessor.from_pretrained(vision_dir), max_length=77)
        samples = SyntheticShapes(batch_size, seed=0, image_size=IMAGE_SIZE)
        batch = collator([samples[i] for i in range(batch_size)])  # input_ids (batch, text), pixel_values
        results["text_tokens"] = list(batch["input_ids"].shape)
        for connector in connectors:
            torch.manual_seed(0)
            config = hive.HiveConfig(
                vision_layers=[int(v) for v in VISION_LAYERS.split(",")],
                llm_layers=[int(v) for v in LLM_LAYERS.split(",")],
                tokens_per_level=TOKENS_PER_LEVEL,
                connector=connector,
            )
            model = hive.HiveForConditionalGeneration.from_vision_text(
                SiglipVisionModel.from_pretrained(vision_dir), LlamaForCausalLM.from_pretrained(language), config
            ).train()
            clock = _ForwardClock([*model.hive_levels.children(), *model.hive_blocks.children()])
            for stage in STAGES:
                step, parts = _time_stage(model, batch, stage=stage, repeats=repeats, hive_clock=clock)
                results[f"{connector} stage {stage}"] = {"step": step, "parts": parts}
                say(
                    f"{connector} stage {stage}: {step:.2f} s per step; "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
                )
            clock.remove()
    return results


def breakdown_table(results: dict) -> str:
    rows = [key for key in results if " stage " in key]
    lines = ["| run | s per step | " + " | ".join(BREAKDOWN_PARTS) + " |", "| --- " * (len(BREAKDOWN_PARTS) + 2) + "|"]
    for key in rows:
        step, parts = results[key]["step"], results[key]["parts"]
        cells = [f"{parts[part]:.2f} s ({parts[part] / step:.0%})" for part in BREAKDOWN_PARTS]
        lines.append(f"| {key} | {step:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
