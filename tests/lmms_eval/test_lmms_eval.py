"""lmms-eval 0.7.3 (make setup-eval): the `hive` model through the real CLI, offline, on generated local tasks.

lmms-eval exits 0 even when a task or model fails, so every test asserts on the files it writes.
"""

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hive_checkpoints import save_hive_checkpoint, save_llava_hf_with_adapter, toy_models
from PIL import Image

from hive_adapter.evaluation.backends import GenerationSettings, HiveBackend, score_continuation
from hive_adapter.evaluation.tasks import write_demo_tasks
from hive_adapter.model.loading import load_hive

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PATH": f"{BIN}:{os.environ['PATH']}"}  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tasks")
    write_demo_tasks(directory, size=4, image_size=32)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("hive")
    return save_hive_checkpoint(toy_models(root / "toy"), root / "checkpoint")


def lmms_eval(output: Path, tasks_dir: Path, model_args: str, *, tasks="hive_demo_mme,hive_demo_vqa", batch_size=4):
    """Run the CLI; return (results, {task: samples}, log)."""
    command = [str(BIN / "lmms-eval"), "--model", "hive", "--model_args", model_args, "--tasks", tasks,
               "--include_path", str(tasks_dir), "--batch_size", str(batch_size), "--output_path", str(output), "--log_samples"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    log = result.stdout + result.stderr
    files = glob.glob(str(output / "**" / "*_results.json"), recursive=True)
    if not files:
        return None, {}, log
    samples = {}
    for path in glob.glob(str(output / "**" / "*_samples_*.jsonl"), recursive=True):
        task = re.search(r"_samples_(.+)\.jsonl$", path).group(1)
        samples[task] = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return json.loads(Path(files[0]).read_text())["results"], samples, log


def test_demo_tasks_are_in_the_hub_formats(tasks):
    import datasets

    mme = datasets.load_dataset("parquet", data_files=str(tasks / "data" / "mme" / "test.parquet"), split="train")
    assert set(mme.column_names) == {"question_id", "image", "question", "answer", "category"}
    assert isinstance(mme[0]["image"], Image.Image) and sorted(set(mme["answer"])) == ["No", "Yes"]
    assert all(mme["question_id"].count(q) == 2 for q in mme["question_id"])  # MME's pairs
    yaml = (tasks / "hive_demo_vqa.yaml").read_text()
    assert "process_docs: !function hive_demo_vqa_utils.process_docs" in yaml and "*" not in yaml  # exact paths


def test_demo_tasks_in_a_relative_directory_point_at_absolute_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's `hive-eval-tasks demo eval_tasks/`, run from the working directory
    written = write_demo_tasks("eval_tasks", size=2, image_size=16)
    assert sorted(path.name for path in written) == ["hive_demo_mme.yaml", "hive_demo_vqa.yaml"]
    yaml = (tmp_path / "eval_tasks" / "hive_demo_mme.yaml").read_text()
    assert str(tmp_path / "eval_tasks" / "data" / "mme" / "test.parquet") in yaml and ".partial" not in yaml


def test_hive_checkpoint_through_the_cli_matches_direct_generation(tasks, checkpoint, tmp_path):
    results, samples, log = lmms_eval(tmp_path / "out", tasks, f"pretrained={checkpoint}")
    assert results is not None, log[-3000:]
    assert 0 <= results["hive_demo_mme"]["mme_perception_score,none"] <= 400  # 2 categories x (acc + acc+) <= 200
    assert 0 <= results["hive_demo_vqa"]["exact_match,none"] <= 1
    assert len(samples["hive_demo_mme"]) == 8 and len(samples["hive_demo_vqa"]) == 8

    # the answers lmms-eval recorded (batched by 4, sorted) are what the model generates for each prompt alone
    backend = HiveBackend(load_hive(checkpoint))
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(tasks / "data" / "mme" / "test.parquet"), split="train")
    for sample in samples["hive_demo_mme"][:4]:
        doc = table[sample["doc_id"]]
        expected = backend.generate(
            [sample["input"]], [[doc["image"].convert("RGB")]], GenerationSettings(max_new_tokens=16)
        )
        assert sample["filtered_resps"].strip() == expected[0]


def test_adapter_on_a_llava_hf_base(tasks, tmp_path):
    base, adapter = save_llava_hf_with_adapter(tmp_path)
    results, samples, log = lmms_eval(
        tmp_path / "out", tasks, f"pretrained={tmp_path / 'base'},adapter={tmp_path / 'adapter'}"
    )
    assert results is not None, log[-3000:]
    assert len(samples["hive_demo_vqa"]) == 8
    assert all(isinstance(sample["filtered_resps"], str) for sample in samples["hive_demo_vqa"])
    # the base places images at markers: the prompt gets one in front of the question
    backend = HiveBackend(load_hive(base, adapter=adapter))
    assert backend.prompt("what shape is it ?", 1) == "<image>\nwhat shape is it ?"


def test_a_bad_model_argument_is_named_and_writes_no_results(tasks, checkpoint, tmp_path):
    results, _, log = lmms_eval(tmp_path / "out", tasks, f"pretrained={checkpoint},colour=red", tasks="hive_demo_vqa")
    assert results is None
    assert "unknown model_args ['colour']" in log


def make_lmms(checkpoint):
    from hive_adapter.evaluation.lmms_model import HiveLmms

    return HiveLmms(pretrained=str(checkpoint))


def request(kind, arguments):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=arguments, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})


def test_loglikelihood_is_the_sum_of_the_continuation_log_probabilities(checkpoint):
    lmms = make_lmms(checkpoint)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    lmms.task_dict = {"t": {"test": [{"image": image}]}}
    [(score, greedy)] = lmms.loglikelihood(
        [
            request(
                "loglikelihood", ("describe the image .", " a red circle", lambda doc: [doc["image"]], 0, "t", "test")
            )
        ]
    )
    backend = lmms.backend
    inputs = backend._encode(["describe the image . a red circle"], padding_side="right")
    prefix = len(backend._encode(["describe the image ."], padding_side="right")["input_ids"][0])
    with torch.no_grad():
        logits = backend.model(**inputs, pixel_values=backend._images([[image]])).logits
    log_probs = torch.log_softmax(logits[0, :-1].float(), -1)
    targets = inputs["input_ids"][0, 1:]
    expected = sum(log_probs[i, targets[i]].item() for i in range(prefix - 1, len(targets)))
    assert score == pytest.approx(expected, rel=1e-5) and score < 0 and isinstance(greedy, bool)
    with pytest.raises(ValueError, match="empty"):
        score_continuation(logits, torch.full_like(inputs["input_ids"], -100))


def test_multi_round_feeds_each_answer_to_the_next_round(checkpoint):
    lmms = make_lmms(checkpoint)
    image = Image.new("RGB", (32, 32), (30, 30, 200))
    lmms.task_dict = {"t": {"test": [{"image": image}]}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output)))
        if round_idx == 2:
            return None, None, True, None, None
        return [doc["image"]], f"describe the image . {previous_output[-1]}", False, None, {"round": round_idx}

    args = ("describe the image .", {"max_new_tokens": 3}, lambda doc: [doc["image"]], doc_to_text, 0, "t", "test")
    [outputs] = lmms.generate_until_multi_round([request("generate_until_multi_round", args)])
    assert len(outputs) == 2 and seen[0] == (1, [outputs[0]]) and seen[1] == (2, outputs)


def test_generation_settings_follow_lmms_eval_conventions():
    settings = GenerationSettings.from_task(
        {"until": "ASSISTANT:", "max_new_tokens": 5, "temperature": 0, "do_sample": False}
    )
    assert settings.until == ("ASSISTANT:",) and settings.generate_kwargs() == {
        "max_new_tokens": 5,
        "num_beams": 1,
        "do_sample": False,
    }
    assert settings.cut("circle ASSISTANT: more") == "circle "
    with pytest.raises(ValueError, match="until=3"):
        GenerationSettings.from_task({"until": 3})


def test_the_paper_protocol_produces_its_table_at_tiny_scale(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "paper_protocol" / "run.py"), "--output_dir", str(tmp_path / "protocol"),
         "--stage1_batch", "32", "--stage2_batch", "16"],
        capture_output=True, text=True, env=ENV, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "protocol" / "protocol.json").read_text())
    assert list(report["rows"]) == ["hive", "cascaded", "concat"]
    for row in report["rows"].values():
        assert set(row) == {"MME-format demo", "VQA-format demo"}
    table = (tmp_path / "protocol" / "protocol.md").read_text()
    assert "| hive |" in table and "| concat |" in table and "| HIVE | 1298 |" in table
    for connector in ("hive", "cascaded", "concat"):  # the LLaVA checkpoints use the standard connector on each encoder
        config = json.loads((tmp_path / "protocol" / f"llava-{connector}" / "config.json").read_text())
        assert (
            config["mm_vision_tower"].endswith(f"encoder-{connector}")
            and config.get("vision_connector", "mlp") == "mlp"
        )


def write_hub_copies(root: Path) -> dict[str, Path]:
    """Tiny local copies laid out like `huggingface-cli download lmms-lab/<name> --repo-type dataset` leaves them."""
    import datasets

    from hive_adapter.data.synthetic import SyntheticShapes

    shapes = SyntheticShapes(2, seed=3, image_size=32)
    images = [shapes.image(i) for i in range(2)]
    image = datasets.Image()

    def save(table: dict, path: Path, image_columns=("image",)) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = datasets.Dataset.from_dict(table)
        for column in image_columns:
            data = data.cast_column(column, image)
        data.to_parquet(str(path))

    save({"question_id": ["a.png", "a.png", "b.png", "b.png"], "image": [images[0], images[0], images[1], images[1]],
          "question": ["Is there a circle? Please answer yes or no."] * 4, "answer": ["Yes", "No", "Yes", "No"],
          "category": ["existence", "existence", "count", "count"]},
         root / "MME" / "data" / "test-00000-of-00001.parquet")  # fmt: skip
    save({"image": images, "question": ["Which shape?", "Which colour?"], "choices": [["circle", "square"], ["red", "blue"]],
          "answer": [0, 1], "hint": ["", "a hint"]},
         root / "ScienceQA" / "ScienceQA-IMG" / "test-00000-of-00001.parquet")  # fmt: skip
    save({"question_id": [1, 2], "image": images, "question": ["What shape?", "What colour?"], "answer": ["circle", "red"],
          "answers": [["circle"] * 10, ["red"] * 10]},
         root / "OK-VQA" / "data" / "val2014-00000-of-00001.parquet")  # fmt: skip
    save({"id": ["q1", "q2"], "imageId": ["i1", "i2"], "question": ["What shape?", "What colour?"], "answer": ["circle", "red"]},
         root / "GQA" / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", image_columns=())  # fmt: skip
    save(
        {"id": ["i1", "i2"], "image": images},
        root / "GQA" / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
    )
    return {name: root / name for name in ("MME", "ScienceQA", "OK-VQA", "GQA")}


def test_local_copies_of_the_four_benchmarks_run_offline(checkpoint, tmp_path):
    copies = write_hub_copies(tmp_path / "hub")
    tasks_dir = tmp_path / "tasks"
    written = subprocess.run(
        [str(BIN / "hive-eval-tasks"), "local", str(tasks_dir), "--mme", str(copies["MME"]), "--scienceqa",
         str(copies["ScienceQA"]), "--okvqa", str(copies["OK-VQA"]), "--gqa", str(copies["GQA"])],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr[-2000:]
    names = "mme_local,scienceqa_img_local,ok_vqa_local,gqa_local"
    results, samples, log = lmms_eval(tmp_path / "out", tasks_dir, f"pretrained={checkpoint}", tasks=names)
    assert results is not None, log[-3000:]
    assert set(results) == set(names.split(","))
    assert {task: len(rows) for task, rows in samples.items()} == {
        "mme_local": 4, "scienceqa_img_local": 2, "ok_vqa_local": 2, "gqa_local": 2,
    }  # fmt: skip
    assert "A. circle\nB. square" in samples["scienceqa_img_local"][0]["input"]  # lmms-eval's own prompt


def test_missing_local_data_is_named(tmp_path):
    from hive_adapter.evaluation.tasks import write_local_tasks

    (tmp_path / "MME").mkdir()
    with pytest.raises(FileNotFoundError, match="no parquet files for split 'test'"):
        write_local_tasks(tmp_path / "tasks", {"mme": str(tmp_path / "MME")})


def test_a_llava_repo_checkpoint_with_the_hive_connector(tasks, tmp_path):
    """LLaVA's own fine-tune (`--vision_connector hive`), then lmms-eval: batched answers equal one-by-one answers."""
    toy = tmp_path / "toy"
    subprocess.run([sys.executable, "-m", "hive_adapter.integrations.llava.toy", str(toy), "--samples", "16"], check=True,
                   capture_output=True, env=ENV)  # fmt: skip
    output = tmp_path / "llava-hive"
    train = subprocess.run(
        [sys.executable, "-m", "hive_adapter.integrations.llava.train", "--vision_connector", "hive",
         "--model_name_or_path", str(toy / "vicuna"), "--version", "v1", "--vision_tower", str(toy / "clip"),
         "--data_path", str(toy / "data" / "finetune.json"), "--image_folder", str(toy / "data"),
         "--mm_projector_type", "mlp2x_gelu", "--image_aspect_ratio", "pad", "--mm_use_im_start_end", "False",
         "--mm_use_im_patch_token", "False", "--bf16", "False", "--use_cpu", "True", "--output_dir", str(output),
         "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--num_train_epochs", "1",
         "--model_max_length", "256", "--lazy_preprocess", "True", "--save_strategy", "no", "--report_to", "none"],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    results, samples, log = lmms_eval(tmp_path / "out", tasks, f"pretrained={output}", tasks="hive_demo_vqa")
    assert results is not None, log[-3000:]
    from hive_adapter.evaluation.backends import LlavaBackend

    backend = LlavaBackend(str(output))
    import datasets

    questions = datasets.load_dataset(
        "parquet",
        data_files=str(tasks / "data" / "vqa" / "testdev_balanced_instructions" / "testdev.parquet"),
        split="train",
    )
    table = datasets.load_dataset(
        "parquet", data_files=str(tasks / "data" / "vqa" / "testdev_balanced_images" / "testdev.parquet"), split="train"
    )
    image_of = dict(zip(table["id"], table["image"], strict=True))
    for sample in samples["hive_demo_vqa"][:3]:
        image = image_of[questions[sample["doc_id"]]["imageId"]]
        expected = backend.generate([sample["input"]], [[image]], GenerationSettings(max_new_tokens=16))
        assert sample["filtered_resps"].strip() == expected[0]
