"""The benchmark harness stays honest: counts agree with the shapes, every mode runs, one command works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu_check, run
from benchmarks.configs import TINY
from benchmarks.flops import count_step, hive_forward_flops, vision_tower_flops
from benchmarks.measure import generation_costs, saved_activation_bytes, step_times
from benchmarks.memory import training_memory
from benchmarks.models import MODES, build, training_batch
from benchmarks.serving import free_port
from hive_adapter.model import cross_attention

REPO = Path(__file__).resolve().parent.parent

TOLERANCE = 0.01  # counted vs analytic forward FLOPs, relative


@pytest.mark.parametrize("mode", MODES)
def test_counted_forward_flops_match_the_analytic_formula(mode):
    model = build(TINY, mode)
    model.requires_grad_(False)
    inputs = training_batch(TINY, mode, batch=1, text_tokens=20, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    vision = 0 if mode == "text" else vision_tower_flops(TINY, stage=1, batch=1)
    counted = counter.get_total_flops() - vision
    analytic = hive_forward_flops(TINY, mode, text_tokens=20)
    assert abs(counted - analytic) <= TOLERANCE * analytic, (counted, analytic)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_mode_counts_a_training_step_on_meta(stage):
    steps = {mode: count_step(TINY, mode, stage=stage, text_tokens=20) for mode in MODES}
    assert all(step.total > 0 for step in steps.values())
    assert steps["hive"].llm_side < steps["concat"].llm_side
    assert (steps["hive"].vision > 0) and steps["text"].vision == 0
    if stage == 3:  # the tower's backward is paid only when it trains
        assert steps["hive"].vision > count_step(TINY, "hive", stage=2, text_tokens=20).vision


def test_hive_grows_linearly_in_vision_tokens_and_concat_quadratically():
    sizes = (32, 64, 96, 128)  # patch 8: 16, 64, 144, 256 vision tokens
    tokens = [TINY.vision_tokens(size) for size in sizes]
    for mode, quadratic in (("hive", False), ("concat", True)):
        flops = [count_step(TINY, mode, stage=2, text_tokens=20, image_size=size).llm_side for size in sizes]
        slopes = [(flops[i + 1] - flops[i]) / (tokens[i + 1] - tokens[i]) for i in range(len(sizes) - 1)]
        if quadratic:
            assert slopes[0] < slopes[1] < slopes[2]
        else:
            assert max(slopes) == pytest.approx(min(slopes), rel=1e-9)


def test_activation_bytes_and_real_step_times_for_every_mode():
    activation = {mode: saved_activation_bytes(TINY, mode, stage=2, text_tokens=20) for mode in MODES}
    assert activation["text"] < activation["hive"] < activation["concat"]
    # Real CPU kernels save less than `meta` (which saves like the reference attention), same ordering.
    cpu = {mode: saved_activation_bytes(TINY, mode, stage=2, text_tokens=20, device="cpu") for mode in MODES}
    assert cpu["text"] < cpu["hive"] < cpu["concat"]
    assert all(0 < cpu[mode] <= activation[mode] for mode in MODES)
    times = step_times(TINY, list(MODES), stage=2, batch=1, text_tokens=20, rounds=1)
    assert set(times) == set(MODES) and all(value["median_s"] > 0 for value in times.values())


def test_generation_costs_count_the_vision_cache_once():
    hive = generation_costs(TINY, "hive", new_tokens=2, text_tokens=12, rounds=1)
    concat = generation_costs(TINY, "concat", new_tokens=2, text_tokens=12, rounds=1)
    assert hive["vision_kv_cache_bytes"] > 0 and concat["vision_kv_cache_bytes"] == 0
    assert hive["prompt_positions"] == 12 and concat["prompt_positions"] == 12 - 1 + TINY.vision_tokens()
    assert hive["text_kv_cache_bytes"] < concat["text_kv_cache_bytes"]


def test_the_one_command_writes_json_table_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "PAIRS", {"1B": TINY, "7B": TINY})
    monkeypatch.setattr(run, "PAPER_1B", TINY)
    monkeypatch.setattr(run, "PAPER_1B_SHALLOW", TINY)
    monkeypatch.setattr(run, "CPU_SMALL", TINY)
    monkeypatch.setattr(run, "VISION_SWEEP", (32, 64))
    monkeypatch.setattr(run, "TEXT_SWEEP", (16, 32))
    monkeypatch.setattr(run, "CPU_VISION_SWEEP", (32, 64))
    run.main(["--suite", "cpu", "--rounds", "1", "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "cpu.json").read_text())
    assert set(results["flops"]["1B"]["2"]) == set(MODES)
    assert set(results["training_memory"]["1B"]["3"]) == set(run.MEMORY_MODES)
    assert set(results["step_time_1B_widths"]) == set(run.MEMORY_MODES)
    table = (tmp_path / "cpu.md").read_text()
    assert "training FLOPs / concat, LLM side, 1B" in table and "peak training memory / concat" in table
    assert "Peak training memory (GB)" in table and "CPU step time at the 1B widths" in table
    for name in ("flops_vs_vision_tokens.png", "flops_vs_text_tokens.png", "cpu_time_vs_vision_tokens.png"):
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_suite_says_it_needs_cuda():
    with pytest.raises(SystemExit, match="no CUDA device is visible"):
        run.run_gpu(1)


def test_the_gpu_check_dry_run_passes_on_cpu_from_a_checkout(tmp_path):
    """`make gpu-check --dry_run`: every check and figure of the GPU run but CUDA, from a checkout (`PYTHONPATH=.`, no
    install), flash-attn replaced by the reference kernel, DeepSpeed's ZeRO-2 audit on gloo."""
    # its DeepSpeed audit opens a gloo rendezvous: a free port, not a fixed one another run may hold
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry_run", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    checks = results["checks"]
    assert {name: check["ok"] for name, check in checks.items()} == dict.fromkeys(checks, True), checks
    assert set(checks) == {"kernel_parity", "one_step", "packing_under_flash", "dtype_audit"}
    for case in checks["kernel_parity"]["cases"].values():  # the spy: flash ran for HIVE and for the LM
        assert case["flash_calls"]["hive"] > 0 and case["flash_calls"]["lm_dense"] > 0
    assert checks["packing_under_flash"]["flash_calls_packed_forward"]["lm_varlen"] > 0
    assert isinstance(checks["dtype_audit"]["deepspeed_zero2_bf16"], dict)  # DeepSpeed ran, not skipped
    kernels = results["figures"]["kernels"]
    assert set(kernels) == set(gpu_check.KERNELS) and kernels["flash_attention_2"]["flash_calls"]["hive"] > 0
    for row in kernels.values():
        assert set(row["modes"]) == set(gpu_check.MODES)
        assert all(
            cell["median_s"] > 0 and cell["predicted_bytes_without_optimizer"] > 0 for cell in row["modes"].values()
        )
    report = (tmp_path / "gpu.md").read_text()
    assert "| flash_attention_2 | hive_lean |" in report and "| kernel_parity | passed |" in report


def test_a_gpu_check_needing_flash_attn_is_skipped_by_name_where_it_does_not_import():
    """The GPU machine may have no flash-attn: its checks say so (skipped, not failed); the run goes on."""
    from benchmarks import kernel_checks

    if cross_attention.flash_varlen_function() is not None:
        pytest.skip("flash-attn imports here")
    result = gpu_check.guarded("kernel parity", lambda: kernel_checks.parity("cpu", dry_run=False))
    assert result["ok"] is None and "pip install flash-attn" in result["skipped"]
    assert gpu_check.verdict(result).startswith("skipped") and gpu_check.failed({"checks": {"p": result}}) == []


def test_the_gpu_check_refuses_without_cuda_and_says_how_to_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the refusal without a GPU")
    with pytest.raises(SystemExit, match="--dry_run"):
        gpu_check.main(["--output_dir", str(tmp_path)])


def test_the_memory_model_adds_states_and_activations():
    hive, concat = (training_memory(TINY, mode, stage=2, text_tokens=20) for mode in ("hive", "concat"))
    assert hive.state_bytes == 2 * hive.parameters + 14 * hive.trainable
    assert 0 < hive.activation_bytes_per_sample < concat.activation_bytes_per_sample
    assert hive.peak_bytes(16) - hive.peak_bytes(1) == 15 * hive.activation_bytes_per_sample
    frozen = training_memory(TINY, "hive", stage=1, text_tokens=20)
    assert frozen.trainable < hive.trainable and frozen.state_bytes < hive.state_bytes


def test_the_lean_projector_meets_its_flop_targets_at_the_paper_shapes():
    """Counted on meta at the full 1B and 7B shapes: LLM side <= 0.11 / 0.13 of concat, <= 1.2x text-only."""
    from benchmarks.configs import PAPER_1B, PAPER_7B

    one = {mode: count_step(PAPER_1B, mode, stage=2).llm_side for mode in ("hive_lean", "concat", "text")}
    seven = {mode: count_step(PAPER_7B, mode, stage=2).llm_side for mode in ("hive_lean", "concat")}
    assert one["hive_lean"] / one["concat"] <= 0.11 and one["hive_lean"] / one["text"] <= 1.2
    assert seven["hive_lean"] / seven["concat"] <= 0.13


def test_the_packing_benchmark_runs_every_mode_both_ways_on_the_same_samples():
    from benchmarks import packing

    distributions = {"short": packing.Distribution("short", 12, 0.5, 4, 24, stage=1)}
    results = packing.run(
        6, 1, 1, 0, True, TINY.vision["image_size"], pair=TINY, flops_pair=TINY, distributions=distributions
    )["short"]
    assert set(results["modes"]) == {"hive padded", "hive packed", "concat padded", "concat packed"}
    assert results["rows"]["packed"][0] < results["rows"]["padded"][0] == 6
    hive_padded, hive_packed = results["modes"]["hive padded"], results["modes"]["hive packed"]
    assert hive_packed["padding_share"] < hive_padded["padding_share"]
    assert all(mode["step_s"] > 0 for mode in results["modes"].values()) and results["vision_tower_s"] > 0
    assert set(results["flops_1b"]) == set(results["modes"]) and all(results["flops_1b"].values())


def _real_lm_run(connector: str, seed: int, content: dict[str, float], *, stages: bool) -> dict:
    """A run record as benchmarks.real_lm writes it (`stages`: the stage-1,2 form; else the earlier stage-1 form)."""
    reading = {
        stage: {"real": {"content": value}, "swapped": {"content": value / 2}} for stage, value in content.items()
    }
    figures = {"losses": [1.0, 0.5], "final_loss": 0.5, "train_loss": 0.7, "steps": 100, "seconds_per_step": 1.5,
               "captions": [{"caption": "a red solid square in the top left", "written": "a red | square\nleft"}]}  # fmt: skip
    run = {"connector": connector, "seed": seed, "image_reading": reading, "torch_threads": 2}
    if stages:
        return {**run, "stages": {stage: figures for stage in content if stage != "0"}}
    return {**run, **figures}


def test_the_real_lm_summary_reads_stage_one_runs_and_stage_two_runs(tmp_path):
    from benchmarks.real_lm import summary

    runs = tmp_path / "runs"
    runs.mkdir()
    for seed, (before, first, second) in enumerate([(0.1, 0.5, 0.9), (0.1, 0.7, 0.7)]):
        record = _real_lm_run("hive", seed, {"0": before, "1": first, "2": second}, stages=True)
        (runs / f"hive-seed{seed}.json").write_text(json.dumps(record))
    old = _real_lm_run("concat", 0, {"0": 0.02, "1": 0.3}, stages=False)  # measured before stage 2 was
    (runs / "concat-seed0.json").write_text(json.dumps(old))
    table = summary(tmp_path)
    hive_row = next(line for line in table.splitlines() if line.startswith("| hive |"))
    assert "| 0,1 | 10.0% ± 0.0 / 5.0% ± 0.0 | 60.0% ± 14.1 / 30.0% ± 7.1 | 80.0% ± 14.1 / 40.0% ± 7.1 |" in hive_row
    concat_row = next(line for line in table.splitlines() if line.startswith("| concat |"))
    assert "| 30.0% / 15.0% | – / – |" in concat_row  # no stage 2 for it: said, not invented
    assert "a red \\| square left" in table  # a caption stays one table cell


def test_the_real_lm_init_study_labels_its_rows_and_passes_the_start_to_hive_train(tmp_path, capsys):
    """Issue 39: `--hive_initializer_range X` reaches hive-train, the runs are kept apart from the default's
    (their own files and work directories) and the table gives them their own row with the steps to a loss."""
    from benchmarks import real_lm

    real_lm.main(["--print_commands", "--seeds", "0", "--connectors", "hive", "--stages", "1",
                  "--hive_initializer_range", "0.02"])  # fmt: skip
    (command,) = capsys.readouterr().out.strip().splitlines()
    assert command.endswith("--hive_initializer_range 0.02") and "/runs/hive-init0.02-seed0 " in command
    with pytest.raises(SystemExit):  # refused before anything trains, naming the value and the default
        real_lm.main(["--seeds", "0", "--connectors", "hive", "--hive_initializer_range", "-1"])
    refusal = capsys.readouterr().err
    assert "--hive_initializer_range: initializer_range=-1.0" in refusal and "or None (the default" in refusal
    runs = tmp_path / "runs"
    runs.mkdir()
    for label, losses in (("hive", [1.2, 0.9, 0.4]), ("hive (init 0.02)", [2.0, 1.5, 1.1])):
        record = _real_lm_run("hive", 0, {"0": 0.1, "1": 0.8}, stages=True)
        record["stages"]["1"] = {**record["stages"]["1"], "losses": losses}
        (runs / f"{label.replace(' ', '_')}-seed0.json").write_text(json.dumps({**record, "label": label}))
    rows = {}
    for line in summary_lines(real_lm.summary(tmp_path)):
        rows.setdefault(line.split(" | ")[0], line)  # the results table comes before the captions
    assert "| 30 |" in rows["| hive"]  # the loss is below 0.5 at the third logged step (every 10)
    assert "| – |" in rows["| hive (init 0.02)"]  # never below it: said, not invented


def summary_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| hive")]


def test_the_real_lm_commands_for_stages_one_and_two_pass_hive_train_checks(capsys):
    from benchmarks import real_lm

    real_lm.main(["--print_commands", "--seeds", "0", "--connectors", "hive,concat,cascaded"])
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 3 and all("--stage 1,2" in c and "--num_train_epochs 1" in c for c in commands)
    real_lm.main(["--print_commands", "--seeds", "0", "--connectors", "hive", "--stages", "1"])
    (stage_one,) = capsys.readouterr().out.strip().splitlines()
    assert "--stage 1 " in stage_one and "--num_train_epochs" not in stage_one
    with pytest.raises(SystemExit):
        real_lm.main(["--print_commands", "--stages", "2"])
    assert "--stages '2': give 1 or 1,2" in capsys.readouterr().err


def test_the_real_lm_breakdown_table_gives_each_part_its_share():
    from benchmarks.real_lm_timing import BREAKDOWN_PARTS, breakdown_table

    parts = dict(zip(BREAKDOWN_PARTS, [0.1, 0.1, 0.4, 0.2, 1.2], strict=True))
    table = breakdown_table({"batch_size": 16, "hive stage 2": {"step": 2.0, "parts": parts}})
    assert "| hive stage 2 | 2.00 | 0.10 s (5%) | 0.10 s (5%) | 0.40 s (20%) | 0.20 s (10%) | 1.20 s (60%) |" in table


def _instruct_result(own: float, swapped: float) -> dict:
    return {
        "own": {"colour": own, "shape": 25.0, "all": own},
        "swapped": {"colour": swapped, "shape": 25.0, "all": swapped},
        "count": {"colour": 40, "shape": 30},
    }


def test_the_instruct_table_gives_mean_and_sd_over_seeds_beside_the_seed_count(capsys):
    from benchmarks import instruct

    settings = instruct.parse(["--seeds", "0,1"])
    record = instruct.merge(None, settings, {0: {"hive": _instruct_result(50.0, 20.0)}})
    record = instruct.merge(record, settings, {1: {"hive": _instruct_result(70.0, 10.0)}})
    record = json.loads(json.dumps(record))  # as read back from instruct.json: seeds become strings
    variant = instruct.parse(["--seeds", "0", "--connectors", "hive", "--hive_initializer_range", "0.1"])
    assert instruct.run_label("hive", variant) == "hive (init 0.1)"
    record = instruct.merge(record, variant, {0: {"hive (init 0.1)": _instruct_result(90.0, 15.0)}})
    table = instruct.markdown(record)
    hive_row = next(line for line in table.splitlines() if line.startswith("| hive |"))
    assert hive_row.startswith("| hive | 2 | 60.0% ± 14.1 / 15.0% ± 7.1 | 60.0% ± 14.1 / 15.0% ± 7.1 |")
    variant_row = next(line for line in table.splitlines() if line.startswith("| hive (init 0.1) |"))
    assert variant_row.startswith("| hive (init 0.1) | 1 | 90.0% / 15.0% |")  # one seed: no sd invented
    assert "| hive | 50.0% / 20.0% | 70.0% / 10.0% |" in table  # the per-seed 'all' row
    assert "--hive_initializer_range 0.1" in table  # every command that made the table is named
    assert "seed 0: colour 40, shape 30; seed 1: colour 40, shape 30" in table  # how many questions each figure is
    other = instruct.parse(["--seeds", "2", "--epochs", "1"])
    with pytest.raises(SystemExit, match="epochs 1.*epochs 3.*--output"):
        instruct.merge(record, other, {2: {"hive": _instruct_result(1.0, 1.0)}})
    assert instruct.parse(["--connectors", "deepstack"]).connectors == "deepstack"
    with pytest.raises(SystemExit):
        instruct.parse(["--connectors", "hive,mlp"])
    assert "--connectors 'hive,mlp': mlp unknown" in capsys.readouterr().err


def test_deepstack_pays_concats_sequence_plus_one_projector_per_level():
    import dataclasses

    from benchmarks import flops

    pair = dataclasses.replace(TINY, hive_layers={"vision_layers": [1, 3]})  # TINY's default spread is one level
    model = build(pair, "deepstack")
    model.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        model(**training_batch(pair, "deepstack", batch=1, text_tokens=20, device="meta"))
    counted = counter.get_total_flops() - vision_tower_flops(pair, stage=1, batch=1)
    analytic = hive_forward_flops(pair, "deepstack", text_tokens=20)
    assert abs(counted - analytic) <= TOLERANCE * analytic, (counted, analytic)
    spliced = flops.llm_forward_flops(pair, 20 - 1 + pair.vision_tokens())
    projector = hive_forward_flops(pair, "concat", text_tokens=20) - spliced
    assert analytic == spliced + 2 * projector  # concat's sequence, and a projector for each of the two levels
    table = flops.flops_table(pair, ["concat", "deepstack"], stages=(2,))
    deepstack_row = next(line for line in table.splitlines() if line.startswith("| 2 | deepstack |"))
    assert float(deepstack_row.split("|")[5]) > 1.0  # LLM side over concat's
