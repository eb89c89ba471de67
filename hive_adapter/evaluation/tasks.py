"""`hive-eval-tasks`: lmms-eval task YAMLs that read local data, for offline machines and clusters.

    hive-eval-tasks local eval_tasks/ --mme /data/MME --scienceqa /data/ScienceQA --okvqa /data/OK-VQA --gqa /data/GQA
    hive-eval-tasks demo eval_tasks/
    lmms-eval --model hive --model_args pretrained=run/stage3 --tasks mme_local --include_path eval_tasks/

`local`: each PATH is a local copy of the lmms-lab dataset lmms-eval's own task downloads (e.g. made
with `huggingface-cli download lmms-lab/MME --repo-type dataset --local-dir /data/MME` where there is
a network) or one parquet file. Writes `mme_local`, `scienceqa_img_local`, `ok_vqa_local` and
`gqa_local`: the built-in tasks' prompts, generation settings and metrics, reading the parquet files
found for the test split by exact path (lmms-eval passes `data_files` to `datasets` as written, so no
globs). GQA needs its own YAML: the built-in one downloads its image table inside `process_docs`.

`demo`: a handful of generated images (the synthetic shapes) in MME's yes/no format
(`hive_demo_mme`) and in GQA's exact-match format (`hive_demo_vqa`), through the same templates.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ..utils.console import quiet_progress_bars
from ..utils.flags import FullFlagParser
from ..utils.outputs import OutputRefused, staged_directory

COMMAND = "hive-eval-tasks"

GENERATION = """generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
"""
EXACT_MATCH = """metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
SHORT_ANSWER = 'post_prompt: "\\nAnswer the question using a single word or phrase."'

TEMPLATES = {
    "mme": {
        "split": "test",
        "body": f"""output_type: generate_until
doc_to_visual: !function {{utils}}.mme_doc_to_visual
doc_to_text: !function {{utils}}.mme_doc_to_text
doc_to_target: "answer"
{GENERATION}process_results: !function {{utils}}.mme_process_results
metric_list:
  - metric: mme_perception_score
    aggregation: !function {{utils}}.mme_aggregate_results
    higher_is_better: true
  - metric: mme_cognition_score
    aggregation: !function {{utils}}.mme_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    {SHORT_ANSWER}
""",
    },
    "scienceqa_img": {
        "split": "test",
        "config": "ScienceQA-IMG",
        "body": f"""output_type: generate_until
doc_to_visual: !function {{utils}}.sqa_doc_to_visual
doc_to_text: !function {{utils}}.sqa_doc_to_text
doc_to_target: !function {{utils}}.sqa_doc_to_target
{GENERATION}{EXACT_MATCH}process_results: !function {{utils}}.sqa_process_results
lmms_eval_specific_kwargs:
  default:
    format: default
    pre_prompt: ""
    post_prompt: "\\nAnswer with the option's letter from the given choices directly."
""",
    },
    "ok_vqa": {
        "split": "val2014",
        "body": f"""output_type: generate_until
doc_to_visual: !function {{utils}}.ok_vqa_doc_to_visual
doc_to_text: !function {{utils}}.ok_vqa_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  until:
    - "ASSISTANT:"
{EXACT_MATCH}process_results: !function {{utils}}.ok_vqa_process_results
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nWhen the provided information is insufficient, respond with 'Unanswerable'.\\nAnswer the question using a single word or phrase."
""",
    },
    "gqa": {
        "split": "testdev",
        "config": "testdev_balanced_instructions",
        "images_config": "testdev_balanced_images",
        "body": f"""output_type: generate_until
process_docs: !function {{utils}}.process_docs
doc_to_visual: !function {{utils}}.gqa_doc_to_visual
doc_to_text: !function {{utils}}.gqa_doc_to_text
doc_to_target: "answer"
{GENERATION}{EXACT_MATCH}lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    {SHORT_ANSWER}
""",
    },
}

UTILS_FILE = '''"""Written by hive-eval-tasks for the task {task}: the functions its YAML names."""

from hive_adapter.evaluation.task_utils import *  # noqa: F401,F403
from hive_adapter.evaluation.task_utils import attach_images

IMAGE_FILES = {image_files!r}


def process_docs(dataset):
    return attach_images(dataset, IMAGE_FILES)
'''


def parquet_files(path: str | Path, split: str, config: str | None = None) -> list[str]:
    """The parquet files of `split` in a local dataset copy (absolute, sorted), or the file itself."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path}: expected a parquet file or a dataset directory")
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    roots = [path / config] if config and (path / config).is_dir() else [path]
    found = sorted(
        str(file)
        for root in roots
        for file in root.rglob("*.parquet")
        if file.stem == split or file.stem.startswith(f"{split}-") or file.parent.name == split
    )
    if not found:
        where = f"{roots[0]}" + (f" (config {config})" if config else "")
        raise FileNotFoundError(
            f"no parquet files for split {split!r} under {where}: expected {split}-*.parquet or {split}.parquet"
        )
    return found


def write_task(
    directory: Path, *, task: str, kind: str, files: list[str], image_files: list[str] | None = None
) -> Path:
    """`directory/<task>.yaml` (+ `<task>_utils.py`) for one local dataset of a built-in task's `kind`."""
    template = TEMPLATES[kind]
    directory.mkdir(parents=True, exist_ok=True)
    utils = f"{task}_utils"
    data_files = "\n".join(f"      - {json.dumps(file)}" for file in files)
    yaml = (
        f"# Written by hive-eval-tasks: lmms-eval's built-in {kind} task on local files.\n"
        f"task: {task}\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    {template['split']}:\n{data_files}\n"
        f"test_split: {template['split']}\n" + template["body"].format(utils=utils) + "metadata:\n  - version: 0.0\n"
    )
    (directory / f"{task}.yaml").write_text(yaml)
    (directory / f"{utils}.py").write_text(UTILS_FILE.format(task=task, image_files=list(image_files or [])))
    return directory / f"{task}.yaml"


def write_local_tasks(directory: str | Path, sources: dict[str, str]) -> list[Path]:
    """YAMLs for local copies of the benchmarks; `sources`: kind (mme, scienceqa_img, ok_vqa, gqa) -> path.
    `directory` must be new, empty, or an earlier output of hive-eval-tasks (replaced whole)."""
    with staged_directory(directory, command=COMMAND, replace=True) as tmp:
        written = _write_local_tasks(tmp, sources)
    return [Path(directory) / path.name for path in written]


def _write_local_tasks(directory: Path, sources: dict[str, str]) -> list[Path]:
    written = []
    for kind, source in sources.items():
        template = TEMPLATES[kind]
        files = parquet_files(source, template["split"], template.get("config"))
        image_files = parquet_files(source, template["split"], template["images_config"]) if kind == "gqa" else None
        if image_files is not None and set(image_files) & set(files):
            raise ValueError(
                f"{source}: GQA needs its questions ({template['config']}/) and its images "
                f"({template['images_config']}/) in separate sub-directories, as the hub stores them"
            )
        written.append(write_task(directory, task=f"{kind}_local", kind=kind, files=files, image_files=image_files))
    return written


def write_demo_tasks(directory: str | Path, *, size: int = 8, seed: int = 0, image_size: int = 64) -> list[Path]:
    """Generated images in MME's and GQA's formats (parquet, as on the hub) and their YAMLs. `directory` must be
    new, empty, or an earlier output of hive-eval-tasks (replaced whole)."""
    directory = Path(directory).expanduser().resolve()  # the YAMLs name absolute files; lmms-eval runs anywhere
    with staged_directory(directory, command=COMMAND, replace=True) as tmp:
        written = _write_demo_tasks(tmp, data_root=directory / "data", size=size, seed=seed, image_size=image_size)
    return [directory / path.name for path in written]


def _write_demo_tasks(directory: Path, *, data_root: Path, size: int, seed: int, image_size: int) -> list[Path]:
    """Writes into `directory` (a temporary sibling); the YAMLs point at `data_root`, where the data ends up."""
    import datasets

    from ..data.synthetic import COLOURS, SHAPES, SyntheticShapes

    shapes = SyntheticShapes(size, seed=seed, image_size=image_size)
    rng = random.Random(seed)
    image = datasets.Image()
    mme = {"question_id": [], "image": [], "question": [], "answer": [], "category": []}
    for index in range(size):
        sample = shapes.sample(index)
        if index % 2:  # MME asks two questions per image, one answered yes and one no
            category, right, wrong = "color", sample.colour, rng.choice([c for c in COLOURS if c != sample.colour])
            ask = "Is there a {} shape in the image? Please answer yes or no."
        else:
            category, right, wrong = "existence", sample.shape, rng.choice([s for s in SHAPES if s != sample.shape])
            ask = "Is there a {} in the image? Please answer yes or no."
        for value, answer in ((right, "Yes"), (wrong, "No")):
            mme["question_id"].append(f"shapes/{index:04d}.png")
            mme["image"].append(shapes.image(index))
            mme["question"].append(ask.format(value))
            mme["answer"].append(answer)
            mme["category"].append(category)
    data = directory / "data"
    (data / "mme").mkdir(parents=True)
    datasets.Dataset.from_dict(mme).cast_column("image", image).to_parquet(str(data / "mme" / "test.parquet"))

    questions = {"id": [], "imageId": [], "question": [], "answer": []}
    for index in range(size):
        sample = shapes.sample(index)
        for number, (question, answer) in enumerate(
            (("What shape is in the image?", sample.shape), ("What colour is the shape?", sample.colour))
        ):
            questions["id"].append(f"{index}-{number}")
            questions["imageId"].append(f"shapes{index:04d}")
            questions["question"].append(question)
            questions["answer"].append(answer)
    for name in ("testdev_balanced_instructions", "testdev_balanced_images"):
        (data / "vqa" / name).mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(questions).to_parquet(
        str(data / "vqa" / "testdev_balanced_instructions" / "testdev.parquet")
    )
    table = {"id": [f"shapes{index:04d}" for index in range(size)], "image": [shapes.image(i) for i in range(size)]}
    datasets.Dataset.from_dict(table).cast_column("image", image).to_parquet(
        str(data / "vqa" / "testdev_balanced_images" / "testdev.parquet")
    )
    gqa = TEMPLATES["gqa"]

    def final(files: list[str]) -> list[str]:  # where each file will be once the directory is in place
        return [str(data_root / Path(file).relative_to(data)) for file in files]

    return [
        write_task(directory, task="hive_demo_mme", kind="mme", files=final(parquet_files(data / "mme", "test"))),
        write_task(
            directory,
            task="hive_demo_vqa",
            kind="gqa",
            files=final(parquet_files(data / "vqa", gqa["split"], gqa["config"])),
            image_files=final(parquet_files(data / "vqa", gqa["split"], gqa["images_config"])),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    quiet_progress_bars()
    parser = FullFlagParser(
        prog="hive-eval-tasks", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="YAMLs for local copies of MME, ScienceQA-IMG, OK-VQA, GQA")
    local.add_argument("directory", help="where the YAMLs go (pass it to lmms-eval --include_path)")
    local.add_argument("--mme", help="local copy of lmms-lab/MME (or its test parquet)")
    local.add_argument("--scienceqa", help="local copy of lmms-lab/ScienceQA (the ScienceQA-IMG config is used)")
    local.add_argument("--okvqa", help="local copy of lmms-lab/OK-VQA (split val2014)")
    local.add_argument("--gqa", help="local copy of lmms-lab/GQA (testdev_balanced_instructions + _images)")
    demo = commands.add_parser("demo", help="generated images in MME's and GQA's formats, for trying the pipeline")
    demo.add_argument("directory")
    demo.add_argument("--size", type=int, default=8, help="images (each asked two questions; default 8)")
    demo.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "demo" and args.size < 1:
        parser.error(f"--size {args.size}: must be at least 1")
    if args.command == "local":
        given = (("mme", args.mme), ("scienceqa_img", args.scienceqa), ("ok_vqa", args.okvqa), ("gqa", args.gqa))
        sources = {kind: path for kind, path in given if path}
        if not sources:
            parser.error("name at least one local dataset: --mme, --scienceqa, --okvqa, --gqa")
    try:
        if args.command == "demo":
            written = write_demo_tasks(args.directory, size=args.size, image_size=args.image_size)
        else:
            written = write_local_tasks(args.directory, sources)
    except OutputRefused as error:
        sys.exit(f"[{COMMAND}] refused: {error}")
    for path in written:
        print(f"[hive-eval-tasks] {path.stem}: {path}")
    print(
        f"[hive-eval-tasks] use with: lmms-eval --include_path {args.directory} --tasks {','.join(p.stem for p in written)}"
    )


if __name__ == "__main__":
    main()
