"""The main demo: HIVE's three-stage pre-training end to end on a CPU, in a few minutes.

    python examples/demo.py [--output_dir outputs/demo] [--train_size 4000]

1. builds a small SigLIP-style vision encoder and a small Llama LM plus a word-level tokenizer, saved as
   ordinary HF model directories (nothing downloaded);
2. pre-trains them the way real checkpoints come (the LM on caption text, the encoder image-text
   contrastive; `hive_adapter.tools.toy_pretraining`): HIVE aligns pre-trained models;
3. trains stage 1 (HIVE modules) -> 2 (+ LLM) -> 3 (+ vision encoder) with `hive-train` on the
   built-in synthetic captioning set (shapes, colours, textures, positions drawn with PIL);
4. reloads the result with `AutoModel`, exports the vision encoder with `hive-export-vision`;
5. reports the loss per stage and, on held-out images, caption-token accuracy on content words (colour,
   texture, shape, position) with each sample's own image and with another sample's image (the control:
   what the model reads from the picture), and on structural words (a / in / the / end of text).
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
from hive_adapter.analysis.image_reading import checkpoint_image_reading
from hive_adapter.data.synthetic import SyntheticShapes, caption_vocabulary
from hive_adapter.tools.toy_models import write_toy_models
from hive_adapter.tools.toy_pretraining import ToyPretraining
from hive_adapter.utils.console import quiet_progress_bars

# The demo fails unless the trained model's content tokens beat the swapped-image control by this much.
REQUIRED_IMAGE_DEPENDENT_ACCURACY = 0.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--train_size", type=int, default=4000)
    parser.add_argument("--held_out_size", type=int, default=256)
    parser.add_argument("--global_batch_size", type=int, default=32)
    args = parser.parse_args()
    quiet_progress_bars(reloads_models=True)  # the demo reloads every stage: no "Loading weights" bar each time
    started = time.time()
    out = args.output_dir
    models = out / "models"

    print(f"[demo] 1/5 building tiny models in {models} (nothing downloaded)")
    print("[demo] 2/5 pre-training them: the LM on caption text, the encoder image-text contrastive")
    vision_dir, language_dir = write_toy_models(models, caption_vocabulary(), pretraining=ToyPretraining())

    print("[demo] 3/5 three-stage HIVE pre-training with hive-train")
    command = [
        sys.executable, "-m", "hive_adapter.training.train",
        "--vision_model", str(vision_dir), "--language_model", str(language_dir),
        "--data_format", "synthetic", "--synthetic_size", str(args.train_size),
        "--stage", "all", "--output_dir", str(out / "run"),
        "--global_batch_size", str(args.global_batch_size), "--per_device_train_batch_size", str(args.global_batch_size),
        "--hive_vision_layers", "1,3,5,7", "--hive_llm_layers", "0,1,2,3", "--hive_tokens_per_level", "16",
        "--save_strategy", "no", "--report_to", "none", "--seed", "0",
    ]  # fmt: skip
    subprocess.run(command, check=True)

    print("[demo] 4/5 reloading with AutoModel and exporting the vision encoder")
    final = out / "run" / "stage3"
    reloaded = AutoModel.from_pretrained(final)
    encoder_dir = out / "vision_encoder"
    subprocess.run([sys.executable, "-m", "hive_adapter.tools.export", str(final), str(encoder_dir)], check=True)
    encoder = AutoModel.from_pretrained(encoder_dir)

    print("[demo] 5/5 caption-token accuracy on held-out synthetic images, own image vs another sample's")
    held_out = SyntheticShapes(args.held_out_size, seed=12345, image_size=reloaded.config.vision_config.image_size)
    readings = {stage: checkpoint_image_reading(out / "run" / f"stage{stage}", held_out) for stage in (0, 1, 2, 3)}

    print("\n================ HIVE demo report ================")
    for stage in (1, 2, 3):
        report = json.loads((out / "run" / f"stage{stage}" / "hive_stage.json").read_text())
        losses = report["losses"]
        trainable = sum(part["trainable"] for part in report["trainable_parameters"].values())
        print(
            f"stage {stage} ({report['name']:<13}) loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
            f"({report['global_steps']} steps, {trainable:,} trainable parameters)"
        )
    print(
        f"\ncaption-token accuracy on {len(held_out)} held-out images (swapped: each sample given the next one's image)"
    )
    print(f"  {'':<22} {'content':>8} {'swapped':>8} {'structural':>11} {'swapped':>8}")
    for stage, reading in readings.items():
        name = "untrained (stage 0)" if stage == 0 else f"after stage {stage}"
        real, swapped = reading.real, reading.swapped
        print(
            f"  {name:<22} {real['content']:8.1%} {swapped['content']:8.1%} "
            f"{real['structural']:11.1%} {swapped['structural']:8.1%}"
        )
    final_reading = readings[3]
    print(
        "  content by attribute after stage 3 (own / swapped image): "
        + ", ".join(
            f"{group} {final_reading.real[group]:.0%} / {final_reading.swapped[group]:.0%}"
            for group in ("colour", "texture", "shape", "position")
        )
    )
    print("\nwritten:")
    print(f"  models (inputs)        {models}")
    print(f"  stage checkpoints      {out / 'run'}/stage{{0,1,2,3}}  (AutoModel.from_pretrained)")
    print(f"  vision encoder         {encoder_dir}  ({type(encoder).__name__})")
    print(f"finished in {time.time() - started:.0f} s")
    first_loss = json.loads((out / "run" / "stage1" / "hive_stage.json").read_text())["losses"][0]
    last_loss = json.loads((out / "run" / "stage3" / "hive_stage.json").read_text())["losses"][-1]
    if last_loss >= first_loss:
        raise SystemExit(f"demo check failed: the loss did not fall ({first_loss:.3f} -> {last_loss:.3f})")
    if final_reading.image_dependent("content") < REQUIRED_IMAGE_DEPENDENT_ACCURACY:
        raise SystemExit(
            f"demo check failed: content tokens {final_reading.describe()}: the model does not read the picture"
        )


if __name__ == "__main__":
    main()
