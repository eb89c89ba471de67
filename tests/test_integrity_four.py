"""No silent wrong results, round four (issue 43): abbreviated flags, the install gap, dependency hygiene, the
backend, encoder verdicts, and instruction data that is never silently lost."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from hive_adapter.training.cli_arguments import parse_arguments


# ---------------------------------------------------------------------- 1. abbreviated flags
def test_an_abbreviated_flag_is_refused_by_hive_train_naming_the_full_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--learning_r .*--learning_rate"):
        parse_arguments(["--stage", "1", "--learning_r", "0.5", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--deeps .*--deepspeed"):
        parse_arguments(["--stage", "1", "--deeps", "zero2", "--output_dir", str(tmp_path)])
    *_, explicit = parse_arguments(["--stage", "1", "--learning-rate", "0.5", "--output_dir", str(tmp_path)])
    assert "learning_rate" in explicit  # the dashed alias is a full flag


def test_hive_train_exits_2_on_an_abbreviated_flag(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "hive_adapter.training.train", "--stage", "1", "--learning_r", "0.5",
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 2 and "--learning_rate" in completed.stderr, completed.stderr[-2000:]
    assert not (tmp_path / "out").exists()


ARGPARSE_CLIS = [
    "hive_adapter.evaluation.tasks",
    "hive_adapter.integrations.llava.toy",
    "hive_adapter.integrations.llava.ask",
    "hive_adapter.tools.export",
    "hive_adapter.tools.toy_models",
    "hive_adapter.analysis.cli",
    "hive_adapter.analysis.learning_curves",
    "hive_adapter.analysis.probe",
    "benchmarks.hypotheses",
    "benchmarks.packing",
    "benchmarks.serving",
    "benchmarks.real_lm",
    "benchmarks.run",
    "benchmarks.gpu_check",
    "benchmarks.instruct",
    "benchmarks.sft_preparation",
    "benchmarks.dtype_audit",
    "benchmarks.flops",
    "benchmarks.family_sizes",
    "benchmarks.vllm_serving",
]


def _main_of(module_name):
    module = importlib.import_module(module_name)
    return module.parse_arguments if module_name.endswith(".reproduce") else module.main


# (hive_adapter.tools.real_lm takes no long flag)
SUBCOMMAND = {
    "hive_adapter.analysis.cli": ["attention", "model", "image.png", "a caption"],
    "hive_adapter.evaluation.tasks": ["demo", "tasks"],
}


@pytest.mark.parametrize("module_name", [*ARGPARSE_CLIS, "hive_adapter.analysis.reproduce"])
def test_every_command_line_tool_refuses_an_abbreviated_flag(module_name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a tool that took the flag would write here
    main = _main_of(module_name)
    before = SUBCOMMAND.get(module_name, [])
    with pytest.raises(SystemExit):
        main([*before[:1], "--help"])
    flags = set(re.findall(r"^\s+(?:-\w[ \w]*, )?(--[a-z][a-z0-9_-]+)", capsys.readouterr().out, re.M)) - {"--help"}
    full = max(sorted(flags), key=len)  # the longest flag: its abbreviation is unambiguous
    abbreviated = full[:-2]
    with pytest.raises(SystemExit) as stopped:
        main([*before, abbreviated, "1"])
    assert stopped.value.code == 2
    assert f"give the full flag ({full}" in capsys.readouterr().err.replace("\n", " ")


def test_hive_serve_refuses_an_abbreviated_flag_of_its_own():
    """hive-serve's own options (`--api-key`, the media limits) are parsed before transformers serve's: an
    abbreviation there is refused too, naming the full flag, not taken as the flag it abbreviates."""
    from hive_adapter.tools.serve import hive_options

    with pytest.raises(SystemExit) as stopped:
        hive_options().parse_known_args(["--api", "secret", "--port", "8000", "model_dir"])
    assert stopped.value.code == 2


def test_hive_llava_train_refuses_an_abbreviated_deepspeed_flag(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "hive_adapter.integrations.llava.train", "--deeps", "zero3.json",
         "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "--deeps is an abbreviation" in completed.stderr and "--deepspeed" in completed.stderr


# ---------------------------------------------------------------------- 3. the install gap
# Replaces an output written by command "t" ("old") with a new one ("new"); `owner.name` is wrapped: at its
# `nth` call the process ends like a `kill -9`, before or after the call runs.
INSTALL_DRIVER = """
import os, shutil, sys
from pathlib import Path
from hive_adapter.utils import outputs
owner, name, nth, when = {owner}, {name!r}, {nth}, {when!r}
if {no_exchange}:
    outputs.exchange = lambda first, second: False
original, calls = getattr(owner, name), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os._exit(9)
    result = original(*args, **kwargs)
    if calls[0] == nth:
        os._exit(9)
    return result
setattr(owner, name, dying)
with outputs.staged_directory(Path(sys.argv[1]), command="t", replace=True) as tmp:
    (tmp / "weights.bin").write_text("new")
"""

INSTALL_KILL_POINTS = {
    "before the first rename": dict(owner="os", name="replace", nth=1, when="before"),
    "between the renames": dict(owner="os", name="replace", nth=2, when="before"),
    "before the old output is deleted": dict(owner="shutil", name="rmtree", nth=1, when="before"),
    "right after the swap": dict(owner="outputs", name="exchange", nth=1, when="after"),
}


def _old_output(target):
    from hive_adapter.utils.outputs import staged_directory

    with staged_directory(target, command="t") as tmp:
        (tmp / "weights.bin").write_text("old")


def _killed_install(target, point, *, no_exchange=False):
    from hive_adapter.utils import outputs

    if point["owner"] == "outputs" and not hasattr(outputs, point["name"]):
        return None  # the code under test has no such step
    script = INSTALL_DRIVER.format(**point, no_exchange=no_exchange)
    return subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("point", list(INSTALL_KILL_POINTS))
def test_a_kill_inside_install_leaves_the_old_output_or_the_new_one_never_none(tmp_path, point):
    from hive_adapter.utils.outputs import OWNER_FILE, staged_directory

    target = tmp_path / "out"
    _old_output(target)
    completed = _killed_install(target, INSTALL_KILL_POINTS[point])
    assert completed is None or completed.returncode in (0, 9), completed.stderr[-2000:]
    assert target.is_dir(), f"killed {point}: {target} is missing"
    assert (target / "weights.bin").read_text() in ("old", "new") and (target / OWNER_FILE).is_file()
    with staged_directory(target, command="t", replace=True) as tmp:  # the next run clears what was left
        (tmp / "weights.bin").write_text("third")
    assert (target / "weights.bin").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_an_atomic_swap_the_next_run_puts_the_old_output_back(tmp_path):
    from hive_adapter.utils.outputs import check_target

    target = tmp_path / "out"
    _old_output(target)
    completed = _killed_install(target, INSTALL_KILL_POINTS["between the renames"], no_exchange=True)
    assert completed.returncode == 9 and not target.exists()  # the documented moment the target is missing
    with pytest.raises(ValueError, match="earlier output of t"):
        check_target(target, command="t")  # recovers first, then refuses to replace without permission
    assert (target / "weights.bin").read_text() == "old"


def test_install_fsyncs_every_file_and_directory_before_renaming(tmp_path, monkeypatch):
    import os

    from hive_adapter.utils import outputs

    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(list(synced)), real_replace(a, b)))
    partial = outputs.start_partial(tmp_path / "out", command="t")
    (partial / "sub").mkdir()
    (partial / "sub" / "weights.bin").write_text("new")
    outputs.install(partial, tmp_path / "out", command="t")
    before_rename = renamed[0]
    for path in (partial / "sub" / "weights.bin", partial / outputs.OWNER_FILE, partial / "sub", partial):
        assert str(path) in before_rename, f"{path} not fsynced before the rename"
    assert str(tmp_path) in synced  # the parent, after the rename


# ---------------------------------------------------------------------- 5. plotting leaves the backend alone
PLOT_IN_A_NOTEBOOK = """
import sys
import matplotlib
matplotlib.use("svg")  # the user's choice (a notebook's inline backend, a GUI one)
from hive_adapter.analysis.plots import plot_layer_curves
plot_layer_curves({"hive": [1.0, 2.0]}, sys.argv[1], ylabel="y", title="t")
import matplotlib.pyplot as plt
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""


def test_plotting_leaves_the_users_matplotlib_backend_and_figures_alone(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", PLOT_IN_A_NOTEBOOK, str(tmp_path / "curves.png")], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["svg", "0"]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------- 7. encoder verdicts by a paired test
def test_one_mean_and_spread_serves_the_encoder_study_and_the_report():
    from hive_adapter.analysis import encoder_quality, reproduce_report, seed_statistics

    assert encoder_quality.mean_and_spread is reproduce_report.mean_and_spread is seed_statistics.mean_and_spread
    assert not hasattr(encoder_quality, "_mean_sd")


def test_a_gain_every_seed_agrees_on_is_greater_though_the_seeds_spread_widely():
    from hive_adapter.analysis import encoder_quality

    def probes(*accuracies):
        return [{"digits": {"layers": [a], encoder_quality.OUTPUT: a}} for a in accuracies]

    change = [{"total": 0.1, "layers": [0.1], "embeddings": 0.1}] * 3
    start = probes(0.50, 0.50, 0.50)
    hive = encoder_quality.summarise(start, probes(0.60, 0.80, 1.00), change)  # +10, +30, +50
    concat = encoder_quality.summarise(start, probes(0.54, 0.76, 0.94), change)  # 6, 4, 6 points less on each seed
    (verdict,) = encoder_quality.verdicts({"Table 3": {"hive": hive, "concat": concat}}, ["digits"])
    # The spread between seeds (20 points) says nothing about a difference every seed shows.
    assert "greater than concat at p < 0.05" in verdict, verdict
    assert "paired t-test over 3 seeds, one-sided p 0.0076" in verdict


# ---------------------------------------------------------------------- 4. dependencies: what is imported is declared
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "flash_attn": "flash-attn", "lmms_eval": "lmms-eval"}
INSTALLED_APART = {"llava"}  # LLaVA's own package, `pip install --no-deps llava-torch` (README, "LLaVA users")


def _declared_requirements():
    import ast

    call = next(
        node
        for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    keywords = {k.arg: k.value for k in call.keywords}
    core = ast.literal_eval(keywords["install_requires"])
    extras = ast.literal_eval(keywords["extras_require"])
    name = lambda requirement: re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0].lower()  # noqa: E731
    return {name(r): r for r in core}, {extra: {name(r) for r in rs} for extra, rs in extras.items()}


def _imported_modules():
    import ast

    found = {}
    for path in (REPO / "hive_adapter").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"hive_adapter"}:
                found.setdefault(top, path.relative_to(REPO))
    return found


def test_every_imported_package_is_declared_and_no_core_requirement_goes_unused():
    core, extras = _declared_requirements()
    declared = set(core).union(*extras.values())
    imported = _imported_modules()
    undeclared = {
        DISTRIBUTIONS.get(module, module): str(path)
        for module, path in imported.items()
        if module not in INSTALLED_APART and DISTRIBUTIONS.get(module, module).lower() not in declared
    }
    assert not undeclared, f"imported but not declared in setup.py: {undeclared}"
    used = {DISTRIBUTIONS.get(module, module).lower() for module in imported}
    assert not set(core) - used, f"core requirements hive_adapter never imports: {set(core) - used}"


def test_the_torch_lower_bound_is_the_tested_torch():
    core, _ = _declared_requirements()
    pinned = re.search(r"^torch==([\d.]+)", (REPO / "requirements" / "constraints.txt").read_text(), re.M)[1]
    from packaging.version import Version

    bound = core["torch"].removeprefix("torch>=")
    assert Version(bound) == Version(pinned), f"{core['torch']}: every test world runs torch {pinned}"


# ---------------------------------------------------------------------- 6, 8-10. instruction data never silently lost
def _instruct_file(tmp_path, entries, *, good=("red.png",)):
    from PIL import Image

    for name in good:
        Image.new("RGB", (32, 32), "red").save(tmp_path / name)
    path = tmp_path / "instruct.json"
    path.write_text(__import__("json").dumps(entries))
    return path


def test_an_image_entry_without_a_user_turn_shows_its_image_before_the_first_answer(tmp_path, instruction_processor):
    from hive_adapter.data.conversations import ConversationDataset, HiveConversationCollator, read_llava_instruct

    system = {"from": "system", "value": "you describe pictures ."}
    path = _instruct_file(tmp_path, [{"id": "no-user", "image": "red.png", "conversations": [
        system, {"from": "gpt", "value": "red"}]}])  # fmt: skip
    dataset = ConversationDataset(read_llava_instruct(path), tmp_path)
    messages = dataset[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]  # the system prompt stays first
    assert messages[1]["content"][0]["type"] == "image"
    batch = HiveConversationCollator(instruction_processor, max_length=64)([dataset[0]])
    assert (batch["input_ids"] == instruction_processor.image_token_id).sum() == 1 and "pixel_values" in batch


TWO_ROUNDS = [
    {"from": "human", "value": "<image>\nwhat colour is it ?"}, {"from": "gpt", "value": "red red red"},
    {"from": "human", "value": "what shape is it ?"}, {"from": "gpt", "value": "square square square"},
]  # fmt: skip


def test_a_conversation_truncation_cuts_is_named_with_the_answers_it_loses(tmp_path, instruction_processor, caplog):
    from hive_adapter.data.conversations import (
        ConversationDataset,
        HiveConversationCollator,
        drop_cut_images,
        read_llava_instruct,
    )

    short = [{"from": "human", "value": "<image>\nwhat colour is it ?"}, {"from": "gpt", "value": "red"}]
    path = _instruct_file(tmp_path, [{"id": "cut", "image": "red.png", "conversations": TWO_ROUNDS},
                                     {"id": "whole", "image": "red.png", "conversations": short}])  # fmt: skip
    dataset = ConversationDataset(read_llava_instruct(path), tmp_path)
    full = HiveConversationCollator(instruction_processor, max_length=10_000).encode(dataset[0]["messages"])
    answers = [position for position, label in enumerate(full[1]) if label != -100]
    max_length = answers[len(answers) // 2]  # the first answer kept, the second round's beyond
    lost = len(answers) - len(answers) // 2
    with caplog.at_level("WARNING"):
        kept = drop_cut_images(dataset, instruction_processor, max_length)
    assert len(kept) == 2 and kept.cut == [f"entry cut: {lost} assistant tokens"]
    message = caplog.text
    assert f"entry cut loses {lost} of {len(answers)}" in message and f"--max_text_length {len(full[0])}" in message
    dropped = drop_cut_images(dataset, instruction_processor, max_length, drop_cut_conversations=True)
    assert [r.id for r in dropped.records] == ["whole"] and dropped.dropped == ["cut"]


def test_conversations_are_rendered_once_in_one_batched_call_per_chunk(tmp_path, instruction_processor, monkeypatch):
    from hive_adapter.data import conversations
    from hive_adapter.data.conversations import ConversationDataset, HiveConversationCollator, read_llava_instruct

    path = _instruct_file(
        tmp_path, [{"id": str(n), "image": "red.png", "conversations": TWO_ROUNDS} for n in range(12)]
    )
    dataset = ConversationDataset(read_llava_instruct(path), tmp_path)
    expected = [HiveConversationCollator(instruction_processor, max_length=10_000).encode(dataset[n]["messages"])
                for n in range(12)]  # fmt: skip
    calls = []
    for owner in (type(instruction_processor), type(instruction_processor.tokenizer)):
        for name in ("apply_chat_template", "__call__"):
            original = getattr(owner, name)
            monkeypatch.setattr(owner, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    lengths = list(conversations.conversation_lengths(dataset, instruction_processor, chunk=5))
    assert calls.count("apply_chat_template") == 3 and calls.count("__call__") == 3  # 12 conversations, chunks of 5
    for (ids, labels, _), length in zip(expected, lengths, strict=True):  # the collator's own rendering
        assert length.tokens == len(ids)
        assert length.answers == tuple(position for position, label in enumerate(labels) if label != -100)
    calls.clear()
    conversations.drop_cut_images(dataset, instruction_processor, 2048)
    assert calls.count("apply_chat_template") == 1 and calls.count("__call__") == 1


def test_every_image_is_checked_before_training_and_bad_ones_named_by_entry(tmp_path):
    from hive_adapter.data.datasets import BadImageError
    from hive_adapter.training.cli_arguments import DataArguments
    from hive_adapter.training.train import build_dataset

    good = [f"{n}.png" for n in range(59)]
    entries = [{"id": f"good-{n}", "image": name, "conversations": TWO_ROUNDS} for n, name in enumerate(good)]
    entries += [{"id": "missing", "image": "nope.png", "conversations": TWO_ROUNDS},
                {"id": "empty", "image": "empty.png", "conversations": TWO_ROUNDS}]  # fmt: skip
    path = _instruct_file(tmp_path, entries, good=good)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImageError) as refused:
        build_dataset(DataArguments(data_path=str(path)), image_size=32, instruct=True)
    message = str(refused.value)
    assert "2 of 61 entries" in message and "--skip_bad_images" in message
    assert "entry missing: nope.png (no such file)" in message and "entry empty: empty.png" in message
    skipped = build_dataset(DataArguments(data_path=str(path), skip_bad_images=True), image_size=32, instruct=True)
    assert len(skipped) == 59 and skipped.skipped == 2 and sorted(skipped.dropped) == ["empty", "missing"]


def test_the_install_recovery_leaves_a_nameless_target_to_the_usual_refusal(tmp_path, monkeypatch):
    from hive_adapter.utils.outputs import OutputRefused, check_target

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputRefused, match="not empty"):
        check_target(__import__("pathlib").Path("."), command="t")
