"""`hive-export-vision`: write a HIVE checkpoint's vision encoder as a plain HF model.

    hive-export-vision out/stage3 vision_encoder/

After pre-training, the encoder is what the paper evaluates (linear probe, LLaVA fine-tune). The export
is the encoder's own class (e.g. `SiglipVisionModel`) with its image processor, so
`AutoModel.from_pretrained(dir)` and LLaVA's `--vision_tower dir` (CLIP encoders) read it directly.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from transformers import AutoImageProcessor

from .modeling_hive import HiveForConditionalGeneration


def export_vision_encoder(checkpoint: str | Path, output: str | Path) -> Path:
    checkpoint, output = Path(checkpoint), Path(output)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no config.json, not a HIVE checkpoint directory")
    model = HiveForConditionalGeneration.from_pretrained(checkpoint)
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.export_vision_model().save_pretrained(tmp)
    try:
        AutoImageProcessor.from_pretrained(checkpoint).save_pretrained(tmp)
    except (OSError, ValueError):
        print(f"[hive-export-vision] note: {checkpoint} has no image processor; only the encoder was written")
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hive-export-vision", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a HIVE checkpoint directory (e.g. out/stage3)")
    parser.add_argument("output", help="where to write the plain HF vision encoder")
    args = parser.parse_args(argv)
    path = export_vision_encoder(args.checkpoint, args.output)
    print(f"[hive-export-vision] vision encoder written to {path}")


if __name__ == "__main__":
    main()
