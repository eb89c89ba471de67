"""The main demo: HIVE's three-stage pre-training end to end on a CPU, in a few minutes.

    python examples/demo.py [--output_dir outputs/demo] [--train_size 4000]

1. builds a small SigLIP-style vision encoder and a small Llama LM (random init, nothing downloaded)
   plus a word-level tokenizer, saved as ordinary HF model directories;
2. trains stage 1 (HIVE modules) -> 2 (+ LLM) -> 3 (+ vision encoder) with `hive-train` on the
   built-in synthetic captioning set (shapes, colours, textures, positions drawn with PIL);
3. reloads the result with `AutoModel`, exports the vision encoder with `hive-export-vision`;
4. reports the loss per stage and caption-token accuracy on held-out images, against the untrained
   model and against the trained model with its images withheld (HIVE then sees a masked-out dummy:
   how much of the accuracy comes from the pictures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoModel

import hive_adapter  # noqa: F401  (registers model_type "hive" with AutoModel)
from hive_adapter.analysis.captioning import checkpoint_caption_accuracy as caption_accuracy
from hive_adapter.data.synthetic import SyntheticShapes, caption_vocabulary
from hive_adapter.toy import write_toy_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--train_size", type=int, default=4000)
    parser.add_argument("--held_out_size", type=int, default=256)
    parser.add_argument("--global_batch_size", type=int, default=32)
    args = parser.parse_args()
    started = time.time()
    out = args.output_dir
    models = out / "models"

    print(f"[demo] 1/4 building tiny models in {models} (random init, nothing downloaded)")
    vision_dir, language_dir = write_toy_models(models, caption_vocabulary())

    print("[demo] 2/4 three-stage HIVE pre-training with hive-train")
    command = [
        sys.executable, "-m", "hive_adapter.train",
        "--vision_model", str(vision_dir), "--language_model", str(language_dir),
        "--data_format", "synthetic", "--synthetic_size", str(args.train_size),
        "--stage", "all", "--output_dir", str(out / "run"),
        "--global_batch_size", str(args.global_batch_size), "--per_device_train_batch_size", str(args.global_batch_size),
        "--hive_vision_layers", "1,3,5,7", "--hive_llm_layers", "0,1,2,3", "--hive_tokens_per_level", "16",
        "--save_strategy", "no", "--report_to", "none", "--seed", "0",
    ]  # fmt: skip
    subprocess.run(command, check=True)

    print("[demo] 3/4 reloading with AutoModel and exporting the vision encoder")
    final = out / "run" / "stage3"
    reloaded = AutoModel.from_pretrained(final)
    encoder_dir = out / "vision_encoder"
    subprocess.run([sys.executable, "-m", "hive_adapter.export", str(final), str(encoder_dir)], check=True)
    encoder = AutoModel.from_pretrained(encoder_dir)

    print("[demo] 4/4 evaluating caption-token accuracy on held-out synthetic images")
    held_out = SyntheticShapes(args.held_out_size, seed=12345, image_size=reloaded.config.vision_config.image_size)
    rows = [
        ("untrained (stage 0)", caption_accuracy(out / "run" / "stage0", held_out)),
        ("after stage 1", caption_accuracy(out / "run" / "stage1", held_out)),
        ("after stage 2", caption_accuracy(out / "run" / "stage2", held_out)),
        ("after stage 3 (HIVE)", caption_accuracy(final, held_out)),
        ("after stage 3, images withheld", caption_accuracy(final, held_out, with_images=False)),
    ]

    print("\n================ HIVE demo report ================")
    for stage in (1, 2, 3):
        report = json.loads((out / "run" / f"stage{stage}" / "hive_stage.json").read_text())
        losses = report["losses"]
        trainable = sum(part["trainable"] for part in report["trainable_parameters"].values())
        print(
            f"stage {stage} ({report['name']:<13}) loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
            f"({report['global_steps']} steps, {trainable:,} trainable parameters)"
        )
    print(f"\ncaption-token accuracy on {len(held_out)} held-out images:")
    for name, accuracy in rows:
        print(f"  {name:<32} {accuracy:6.1%}")
    print("\nwritten:")
    print(f"  models (inputs)        {models}")
    print(f"  stage checkpoints      {out / 'run'}/stage{{0,1,2,3}}  (AutoModel.from_pretrained)")
    print(f"  vision encoder         {encoder_dir}  ({type(encoder).__name__})")
    print(f"finished in {time.time() - started:.0f} s")
    first_loss = json.loads((out / "run" / "stage1" / "hive_stage.json").read_text())["losses"][0]
    last_loss = json.loads((out / "run" / "stage3" / "hive_stage.json").read_text())["losses"][-1]
    if not (last_loss < first_loss and rows[3][1] > rows[0][1] and rows[3][1] > rows[4][1]):
        raise SystemExit("demo check failed: the loss did not fall or the images did not help")


if __name__ == "__main__":
    main()
