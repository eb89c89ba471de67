"""The paper's VLM protocol as one path, for `hive`, `cascaded` and `concat` encoders alike.

    python examples/paper_protocol/run.py --output_dir outputs/protocol            # tiny, CPU, a few minutes

For each connector:
1. HIVE pre-training, three stages (`hive-train`, Table 3) of a vision encoder with an LLM;
2. `hive-export-vision`: the encoder as a plain HF model;
3. LLaVA's two-stage fine-tune with the *standard* connector (`--vision_connector mlp`) on that encoder,
   with supplementary Table 5's settings: connector training at lr 1e-3, global batch 256, then LLM
   fine-tuning at lr 2e-5, global batch 64; cosine; 3% warmup (66 / 347 of 2180 / 11540 iterations);
   no weight decay; clipping 1.0;
4. lmms-eval with the `hive` model on the LLaVA checkpoint;
and one table shaped like the paper's (connector x benchmark).

Without arguments everything is tiny and generated: LLaVA's toy set (a CLIP tower, a Vicuna-style
Llama, synthetic images in LLaVA's JSON) and the demo tasks in MME's and GQA's formats. At scale:

    python examples/paper_protocol/run.py --output_dir runs/protocol \\
        --vision_model google/siglip-so400m-patch14-384 --language_model TinyLlama/TinyLlama_v1.1 \\
        --pretrain_data blip_laion_cc_sbu_558k.json --pretrain_images LLaVA-Pretrain/images \\
        --llava_model lmsys/vicuna-7b-v1.5 --finetune_data llava_v1_5_mix665k.json --finetune_images playground/data \\
        --hive_args "--deepspeed zero2 --bf16 True --per_device_train_batch_size 32" --hive_launcher "deepspeed --num_gpus 8" \\
        --llava_launcher "deepspeed --num_gpus 8" --world_size 8 --per_device_batch 16 \\
        --llava_args "--deepspeed examples/llava/zero2.json --bf16 True --model_max_length 2048" \\
        --tasks mme_local,gqa_local,ok_vqa_local,scienceqa_img_local --include_path eval_tasks/

(`hive-eval-tasks local eval_tasks/ --mme ... --gqa ...` writes those task YAMLs.)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

CONNECTORS = ("hive", "cascaded", "concat")
# supplementary Table 5
STAGE1 = {"learning_rate": "1e-3", "batch": 256}
STAGE2 = {"learning_rate": "2e-5", "batch": 64}
PAPER = {  # the paper's headline numbers (1B setting), for the shape of the table
    "self-attention (concat)": {"MME": 1263, "GQA": 57.69, "OK-VQA": 46.19, "ScienceQA": 59.56},
    "HIVE": {"MME": 1298, "GQA": 58.05, "OK-VQA": 51.01, "ScienceQA": 63.12},
}
COLUMNS = {  # task -> (column, metric key in lmms-eval's results, scale)
    "mme_local": ("MME", "mme_perception_score,none", 1),
    "gqa_local": ("GQA", "exact_match,none", 100),
    "ok_vqa_local": ("OK-VQA", "exact_match,none", 100),
    "scienceqa_img_local": ("ScienceQA", "exact_match,none", 100),
    "hive_demo_mme": ("MME-format demo", "mme_perception_score,none", 1),
    "hive_demo_vqa": ("VQA-format demo", "exact_match,none", 100),
}


def run(command: list[str], log: Path, *, env: dict | None = None) -> None:
    """Run one step, its output to `log`; stop with the log's tail on failure."""
    print(f"  $ {shlex.join(command)}", flush=True)
    started = time.time()
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"step failed (exit {result.returncode}), log {log}:\n{tail}")
    print(f"    done in {time.time() - started:.0f} s (log: {log})", flush=True)


def launcher(value: str) -> list[str]:
    """A launcher prefix: `python -m` by default, or e.g. `deepspeed --num_gpus 8` (which takes `--module`)."""
    if not value:
        return [sys.executable, "-m"]
    return [*shlex.split(value), "--module"]


def accumulation(global_batch: int, per_device: int, world_size: int, samples: int) -> tuple[int, int]:
    """(gradient_accumulation_steps, effective global batch) for a Table 5 batch, capped at the data size."""
    target = min(global_batch, samples)
    steps = max(1, target // (per_device * world_size))
    return steps, steps * per_device * world_size


def count_samples(path: str) -> int:
    return len(json.loads(Path(path).read_text()))


def read_results(directory: Path) -> dict:
    files = sorted(glob.glob(str(directory / "**" / "*_results.json"), recursive=True))
    if not files:
        raise SystemExit(
            f"lmms-eval wrote no *_results.json under {directory} (it exits 0 even on errors; see its log)"
        )
    return json.loads(Path(files[-1]).read_text())["results"]


def table(rows: dict[str, dict], tasks: list[str]) -> str:
    columns = [COLUMNS.get(task, (task, None, 1))[0] for task in tasks]
    lines = ["| encoder pre-trained with | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(values.get(column, "") for column in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/protocol"))
    parser.add_argument("--connectors", default=",".join(CONNECTORS))
    data = parser.add_argument_group("models and data (default: the tiny generated set)")
    data.add_argument("--vision_model"), data.add_argument("--language_model", help="LM of the HIVE pre-training")
    data.add_argument("--pretrain_data"), data.add_argument("--pretrain_images")
    data.add_argument("--llava_model", help="LLM of the LLaVA fine-tune (default: --language_model)")
    data.add_argument("--connector_data", help="LLaVA stage-1 data (default: --pretrain_data)")
    data.add_argument("--connector_images")
    data.add_argument("--finetune_data"), data.add_argument("--finetune_images")
    steps = parser.add_argument_group("training and evaluation")
    steps.add_argument("--hive_args", default="--global_batch_size 16 --per_device_train_batch_size 16 --hive_tokens_per_level 16",
                       help="extra hive-train flags (default: tiny)")  # fmt: skip
    steps.add_argument("--hive_launcher", default="", help='e.g. "deepspeed --num_gpus 8" (default: one process)')
    steps.add_argument("--llava_launcher", default="")
    steps.add_argument("--llava_args", default="--model_max_length 512 --bf16 False --use_cpu True",
                       help="extra flags for both LLaVA stages (default: CPU, tiny)")  # fmt: skip
    steps.add_argument("--per_device_batch", type=int, default=8)
    steps.add_argument("--world_size", type=int, default=1)
    steps.add_argument("--stage1_batch", type=int, default=STAGE1["batch"], help="Table 5: 256")
    steps.add_argument("--stage2_batch", type=int, default=STAGE2["batch"], help="Table 5: 64")
    steps.add_argument("--tasks", default="hive_demo_mme,hive_demo_vqa")
    steps.add_argument("--include_path", default=None, help="task YAML folder (default: the demo tasks, written here)")
    steps.add_argument("--eval_device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    args = parser.parse_args(argv)

    connectors = [c.strip() for c in args.connectors.split(",") if c.strip()]
    if not connectors or set(connectors) - set(CONNECTORS):
        parser.error(f"--connectors {args.connectors!r}: choose from {','.join(CONNECTORS)}")
    out = args.output_dir.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    python = [sys.executable, "-m"]
    started = time.time()

    if args.vision_model is None:
        print("[protocol] tiny setting: generating LLaVA's toy set (CLIP tower, Vicuna-style Llama, synthetic images)")
        run(
            [*python, "hive_adapter.integrations.llava.toy", str(out / "toy"), "--samples", "128"],
            logs / "toy.log",
            env=env,
        )
        toy = out / "toy"
        args.vision_model, args.language_model = str(toy / "clip"), str(toy / "vicuna")
        args.pretrain_data, args.pretrain_images = str(toy / "data" / "pretrain.json"), str(toy / "data")
        args.finetune_data, args.finetune_images = str(toy / "data" / "finetune.json"), str(toy / "data")
    missing = [name for name in ("language_model", "pretrain_data", "pretrain_images", "finetune_data", "finetune_images")
               if getattr(args, name) is None]  # fmt: skip
    if missing:
        parser.error("with --vision_model also give " + ", ".join(f"--{name}" for name in missing))
    llava_model = args.llava_model or args.language_model
    connector_data = args.connector_data or args.pretrain_data
    connector_images = args.connector_images or args.pretrain_images
    include_path = args.include_path
    if include_path is None:
        include_path = str(out / "eval_tasks")
        run([*python, "hive_adapter.evaluation.tasks", "demo", include_path], logs / "eval_tasks.log", env=env)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]

    accumulate1, batch1 = accumulation(
        args.stage1_batch, args.per_device_batch, args.world_size, count_samples(connector_data)
    )
    accumulate2, batch2 = accumulation(
        args.stage2_batch, args.per_device_batch, args.world_size, count_samples(args.finetune_data)
    )
    if (batch1, batch2) != (args.stage1_batch, args.stage2_batch):
        print(
            f"[protocol] note: global batches {batch1} / {batch2} (Table 5: {args.stage1_batch} / {args.stage2_batch}), capped by the data size"
        )
    common = ["--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
              "--mm_use_im_patch_token", "False", "--num_train_epochs", "1", "--weight_decay", "0.", "--max_grad_norm", "1.0",
              "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--per_device_train_batch_size", str(args.per_device_batch),
              "--lazy_preprocess", "True", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
              *shlex.split(args.llava_args)]  # fmt: skip
    rows, raw = {}, {}
    for connector in connectors:
        print(f"[protocol] === {connector} ===")
        pretrain, encoder = out / f"hive-pretrain-{connector}", out / f"encoder-{connector}"
        llava1, llava2 = out / f"llava-{connector}-connector", out / f"llava-{connector}"
        run([*launcher(args.hive_launcher), "hive_adapter.training.train", "--vision_model", args.vision_model,
             "--language_model", args.language_model, "--data_path", args.pretrain_data, "--image_folder", args.pretrain_images,
             "--vision_connector", connector, "--stage", "all", "--output_dir", str(pretrain), "--save_strategy", "no",
             "--report_to", "none", "--disable_tqdm", "True", *shlex.split(args.hive_args)], logs / f"{connector}-1-hive-train.log", env=env)  # fmt: skip
        run(
            [*python, "hive_adapter.tools.export", str(pretrain / "stage3"), str(encoder)],
            logs / f"{connector}-2-export.log",
            env=env,
        )
        entry = [*launcher(args.llava_launcher), "hive_adapter.integrations.llava.train", "--vision_connector", "mlp",
                 "--model_name_or_path", llava_model, "--vision_tower", str(encoder)]  # fmt: skip
        run([*entry, "--version", "plain", "--data_path", connector_data, "--image_folder", connector_images,
             "--tune_mm_mlp_adapter", "True", "--learning_rate", STAGE1["learning_rate"],
             "--gradient_accumulation_steps", str(accumulate1), "--output_dir", str(llava1), *common], logs / f"{connector}-3-llava-connector.log", env=env)  # fmt: skip
        run([*entry, "--version", "v1", "--data_path", args.finetune_data, "--image_folder", args.finetune_images,
             "--pretrain_mm_mlp_adapter", str(llava1 / "mm_projector.bin"), "--image_aspect_ratio", "pad",
             "--learning_rate", STAGE2["learning_rate"], "--gradient_accumulation_steps", str(accumulate2),
             "--output_dir", str(llava2), *common], logs / f"{connector}-4-llava-finetune.log", env=env)  # fmt: skip
        evaluation = out / f"eval-{connector}"
        run(["lmms-eval", "--model", "hive", "--model_args", f"pretrained={llava2},device={args.eval_device}",
             "--tasks", ",".join(tasks), "--include_path", include_path, "--batch_size", "8",
             "--output_path", str(evaluation), "--log_samples"], logs / f"{connector}-5-lmms-eval.log",
            env={**env, "HF_DATASETS_OFFLINE": env.get("HF_DATASETS_OFFLINE", "1")})  # fmt: skip
        results = read_results(evaluation)
        raw[connector] = results
        values = {}
        for task in tasks:
            column, key, scale = COLUMNS.get(task, (task, "exact_match,none", 100))
            if task not in results or key not in results[task]:
                raise SystemExit(f"lmms-eval results for {connector} lack {task}/{key}: {sorted(results)}")
            values[column] = f"{results[task][key] * scale:.2f}"
        rows[connector] = values

    report = table(rows, tasks)
    paper = table({name: {k: str(v) for k, v in values.items()} for name, values in PAPER.items()},
                  ["mme_local", "gqa_local", "ok_vqa_local", "scienceqa_img_local"])  # fmt: skip
    minutes = (time.time() - started) / 60
    (out / "protocol.json").write_text(
        json.dumps({"tasks": tasks, "rows": rows, "lmms_eval": raw, "minutes": minutes}, indent=2)
    )
    (out / "protocol.md").write_text(f"{report}\n\nThe paper (1B setting):\n\n{paper}\n")
    print(f"\n{report}\n\nthe paper (1B setting), for the shape:\n{paper}\n")
    print(f"[protocol] finished in {minutes:.1f} min; table: {out / 'protocol.md'}")


if __name__ == "__main__":
    main()
