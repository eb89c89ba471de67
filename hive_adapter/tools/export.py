"""`hive-export-vision`: write a HIVE checkpoint's vision encoder as a plain HF model.

    hive-export-vision out/stage3 vision_encoder/

After pre-training, the encoder is what the paper evaluates (linear probe, LLaVA fine-tune). The export
is the encoder's own class (e.g. `SiglipVisionModel`) with its image processor, so
`AutoModel.from_pretrained(dir)` and LLaVA's `--vision_tower dir` (CLIP encoders) read it directly.

The output directory must be new or empty; `--overwrite` replaces an earlier export of this command, and
nothing else (see `hive_adapter.utils.outputs`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoImageProcessor

from ..model.modeling_hive import HiveForConditionalGeneration
from ..utils.console import quiet_progress_bars
from ..utils.flags import FullFlagParser
from ..utils.outputs import OutputRefused, check_target, staged_directory

COMMAND = "hive-export-vision"


def export_vision_encoder(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    checkpoint, output = Path(checkpoint), Path(output)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no config.json, not a HIVE checkpoint directory")
    # Before loading anything: refuse a target that is not ours, or that holds the checkpoint itself.
    check_target(output, command=COMMAND, replace=overwrite, protect=[checkpoint], replace_flag="--overwrite")
    model = HiveForConditionalGeneration.from_pretrained(checkpoint)
    with staged_directory(
        output, command=COMMAND, replace=overwrite, protect=[checkpoint], replace_flag="--overwrite"
    ) as tmp:
        model.export_vision_model().save_pretrained(tmp)
        try:
            AutoImageProcessor.from_pretrained(checkpoint).save_pretrained(tmp)
        except (OSError, ValueError):
            print(f"[{COMMAND}] note: {checkpoint} has no image processor; only the encoder was written")
    return output


def main(argv: list[str] | None = None) -> None:
    quiet_progress_bars()
    parser = FullFlagParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a HIVE checkpoint directory (e.g. out/stage3)")
    parser.add_argument("output", help="where to write the plain HF vision encoder (a new or empty directory)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export of this command at OUTPUT (nothing else)"
    )
    args = parser.parse_args(argv)
    try:
        path = export_vision_encoder(args.checkpoint, args.output, overwrite=args.overwrite)
    except (OutputRefused, FileNotFoundError) as error:
        sys.exit(f"[{COMMAND}] refused: {error}")
    print(f"[{COMMAND}] vision encoder written to {path}")


if __name__ == "__main__":
    main()
