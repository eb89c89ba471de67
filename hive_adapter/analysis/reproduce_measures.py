"""What `hive-reproduce` measures on each connector's checkpoints, beyond image reading and the probes:
how far stage 3 moved the encoder, the caption loss's gradient into every encoder layer, each
cross-attention block's entropy and gate, and the FLOPs and time of one training step.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.synthetic import PROMPT, SyntheticShapes
from ..model.loading import load_hive
from . import encoder_quality
from .attention import attention_entropy
from .captioning import caption_batch
from .gradients import gradient_flow
from .image_reading import checkpoint_image_reading
from .probe_data import built_in
from .probe_features import load_frozen_encoder
from .reproduce_report import elementwise_mean, summarise_readings
from .reproduce_settings import CROSS_ATTENTION, PROBE_TASKS
from .reproduce_work import seconds_per_step, stage_report
from .seed_statistics import mean_and_spread


def encoder_change(before: Path, after: Path) -> float:
    """Relative L2 change of the vision encoder's weights between two checkpoints (how far stage 3 moved it)."""
    first, second = load_frozen_encoder(before)[0].state_dict(), load_frozen_encoder(after)[0].state_dict()
    moved = sum(float((second[name].float() - tensor.float()).pow(2).sum()) for name, tensor in first.items())
    size = sum(float(tensor.float().pow(2).sum()) for tensor in first.values())
    return (moved / size) ** 0.5


def held_out_batch(loaded, held_out: SyntheticShapes, count: int) -> dict[str, torch.Tensor]:
    indices = range(min(count, len(held_out)))
    return caption_batch(
        loaded, [held_out.image(i) for i in indices], [held_out.caption(i) for i in indices], prompt=PROMPT
    )


def gradient_profile(checkpoint: Path, held_out: SyntheticShapes, count: int) -> dict:
    """Per-layer gradient norms (raw, and relative to the text input's) and object share, mean over `count`
    held-out pairs, plus sample 0's maps."""
    loaded = load_hive(checkpoint)
    flow = gradient_flow(loaded.model, held_out_batch(loaded, held_out, count))
    masks = torch.stack(
        [torch.from_numpy(np.array(held_out.object_mask(i), dtype=np.float32) / 255) for i in range(len(flow.losses))]
    )
    return {
        "grad_norm": flow.layer_norms.mean(0).tolist(),
        "relative_grad_norm": flow.relative_norms.mean(0).tolist(),
        "text_input_grad_norm": float(flow.text_input_norms.mean()),
        "object_share": flow.object_share(masks).mean(0).tolist(),
        "object_area": float(masks.mean()),
        "sample_maps": flow.patch_maps[0],
        "sample_norms": flow.layer_norms[0].tolist(),
    }


def cross_attention_profile(checkpoint: Path, held_out: SyntheticShapes, count: int) -> dict:
    """Attention entropy per block (nats, over `count` held-out pairs), its uniform maximum and tanh(gate) per block."""
    loaded = load_hive(checkpoint)
    entropy = attention_entropy(loaded.model, held_out_batch(loaded, held_out, count))
    gates = [
        math.tanh(param.item()) for name, param in loaded.model.named_parameters() if name.endswith("hive_attn_gate")
    ]
    config, shape = loaded.model.hive_config, loaded.model.hive_vision_shape
    keys = config.tokens_per_level or (shape.image_size // shape.patch_size) ** 2  # one level per block ("paired")
    return {"attention_entropy": entropy.tolist(), "uniform_entropy": math.log(keys), "tanh_gate": gates}


def step_costs(stage0: dict[str, Path], sample_batch: dict, rounds: int = 5) -> dict[str, dict]:
    """FLOPs (counted; in total and without the vision tower's share) and median seconds of one
    forward+backward with every parameter training (stage 3)."""
    models = {}
    for connector, path in stage0.items():
        model = load_hive(path).model.train()
        model.requires_grad_(True)
        models[connector] = model
    out = {}
    for connector, model in models.items():
        with FlopCounterMode(display=False) as counter:
            model(**sample_batch).loss.backward()
        model.zero_grad(set_to_none=True)
        tower = sum(counter.get_flop_counts().get(f"{type(model).__name__}.vision_model", {}).values())
        total = counter.get_total_flops()
        out[connector] = {"gflops": total / 1e9, "gflops_without_tower": (total - tower) / 1e9, "times": []}
    for _ in range(rounds):  # interleaved, so machine noise hits every connector alike
        for connector, model in models.items():
            started = time.perf_counter()
            model(**sample_batch).loss.backward()
            out[connector]["times"].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    for connector in out:
        out[connector]["ms"] = 1000 * statistics.median(out[connector].pop("times"))
    return out


def measure_encoders(
    runs: dict, moved: dict, connectors: list[str], seeds, *, budget, probe_config, moving: str
) -> tuple[dict, dict, dict]:
    """The encoder study (step 3): each exported encoder and the one it started from, probed at every layer on
    PROBE_TASKS, and each layer's weight change, under Table 3's stage 3 (`runs`) and the moving one (`moved`).
    Returns the per-connector results it starts, the starting encoder's probes and the study."""
    probe_sets = {
        seed: {name: built_in(name, seed=seed, size=budget.probe_size) for name in PROBE_TASKS} for seed in seeds
    }
    start_probes = [
        encoder_quality.probe_encoder(runs[seed][connectors[0]] / "stage0", probe_sets[seed], probe_config)
        for seed in seeds
    ]
    start_probe = {n: mean_and_spread([p[n][encoder_quality.OUTPUT] for p in start_probes]) for n in PROBE_TASKS}
    encoder_budgets: dict[str, dict] = {"Table 3": {}, moving: {}}
    results = {}
    for connector in connectors:
        for label, final in (("Table 3", runs), (moving, moved)):
            exported = [
                encoder_quality.probe_encoder(final[s][connector] / "stage3", probe_sets[s], probe_config)
                for s in seeds
            ]
            changes = [
                encoder_quality.layer_change(runs[s][connector] / "stage0", final[s][connector] / "stage3")
                for s in seeds
            ]
            encoder_budgets[label][connector] = encoder_quality.summarise(start_probes, exported, changes)
        table3 = encoder_budgets["Table 3"][connector]
        results[connector] = {
            "probe": {n: table3["tasks"][n][encoder_quality.OUTPUT] for n in PROBE_TASKS},
            "encoder_change_stage3": table3["change"]["total"]["mean"],
        }
    encoder_study = {
        "start": encoder_quality.summarise_start(start_probes),
        "budgets": encoder_budgets,
        "verdicts": encoder_quality.verdicts(encoder_budgets, list(PROBE_TASKS)),
    }
    return results, start_probe, encoder_study


def measure_reading(runs: dict, connectors: list[str], held_out: dict, budget, results: dict) -> dict:
    """Image reading (own vs swapped image, per stage), gradients into the encoder at the stage-2 checkpoints,
    cross-attention entropy and gates, time per step and final losses (step 4), into `results`; returns the first
    seed's gradient profile per connector (its sample maps)."""
    seeds = list(runs)
    profiles = {}
    for connector in connectors:
        row = results[connector]
        by_stage = {
            stage: [
                checkpoint_image_reading(runs[s][connector] / f"stage{stage}", held_out[s]).to_dict() for s in seeds
            ]
            for stage in (1, 2, 3)
        }
        row["image_reading"] = summarise_readings(by_stage[3])
        row["image_reading_by_stage"] = {stage: summarise_readings(readings) for stage, readings in by_stage.items()}
        # the signal the encoder trains on in stage 3: gradients at the stage-2 checkpoints
        per_seed = [
            gradient_profile(runs[s][connector] / "stage2", held_out[s], budget.gradient_samples) for s in seeds
        ]
        profiles[connector] = per_seed[0]  # sample maps of the first seed
        row["gradients"] = {
            key: elementwise_mean([p[key] for p in per_seed])
            for key in ("grad_norm", "relative_grad_norm", "object_share")
        } | {"text_input_grad_norm": statistics.fmean(p["text_input_grad_norm"] for p in per_seed)}
        row["object_area"] = per_seed[0]["object_area"]
        if connector in CROSS_ATTENTION:
            attention = [
                cross_attention_profile(runs[s][connector] / "stage3", held_out[s], budget.gradient_samples)
                for s in seeds
            ]
            row["cross_attention"] = {
                "attention_entropy": elementwise_mean([a["attention_entropy"] for a in attention]),
                "tanh_gate": elementwise_mean([a["tanh_gate"] for a in attention]),
                "uniform_entropy": attention[0]["uniform_entropy"],
                "per_seed": attention,
            }
        row["train_seconds_per_step"] = statistics.fmean(
            seconds_per_step(stage_report(runs[s][connector], 3)) for s in seeds
        )
        row["final_losses"] = {
            stage: [stage_report(runs[s][connector], stage)["losses"][-1] for s in seeds] for stage in (1, 2, 3)
        }
    return profiles
