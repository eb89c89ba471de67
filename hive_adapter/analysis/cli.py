"""`hive-analyze`: gradient-flow and cross-attention maps of a trained model on one image and caption.

    hive-analyze gradients run/stage3 photo.png "a red circle in the top left" --prompt "describe the image ."
    hive-analyze attention run/stage3 photo.png "a red circle in the top left" --token circle

CKPT is a HIVE checkpoint directory (any connector: hive, cascaded, concat); for a PEFT-style adapter
pass the base model as CKPT and `--adapter DIR`. Writes a PNG (`--output`) and the numbers as JSON
next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..data.collator import IGNORE_INDEX
from ..model.loading import load_hive
from ..utils.console import quiet_progress_bars
from ..utils.flags import FullFlagParser
from ..utils.outputs import OutputRefused, output_file, write_file
from .attention import cross_attention_maps
from .captioning import caption_batch
from .gradients import gradient_flow
from .plots import plot_attention_maps, plot_gradient_maps


def token_text(tokenizer, token_id: int) -> str:
    """A token as a reader sees it (SentencePiece / byte-level word markers removed)."""
    return tokenizer.convert_ids_to_tokens(int(token_id)).replace("\u2581", "").replace("\u0120", "").strip()


def produced_positions(tokenizer, token_ids: list[int], labels: list[int], word: str | None, limit: int) -> list[int]:
    """Text positions whose token the figure explains: those equal to `word`, or every caption token."""
    if word is None:
        positions = [index for index, label in enumerate(labels) if label != IGNORE_INDEX and index > 0]
        return positions[:limit]
    wanted = word.strip().lower()
    positions = [
        index for index in range(1, len(token_ids)) if token_text(tokenizer, token_ids[index]).lower() == wanted
    ]
    if not positions:
        seen = " ".join(token_text(tokenizer, token) for token in token_ids)
        raise SystemExit(f"hive-analyze: --token {word!r} is not a token of the text; its tokens are: {seen}")
    return positions


def _load(args):
    image_path = Path(args.image)
    if not image_path.is_file():
        raise SystemExit(f"hive-analyze: image {image_path} does not exist")
    loaded = load_hive(args.checkpoint, adapter=args.adapter, device=args.device)
    image = Image.open(image_path).convert("RGB")
    batch = caption_batch(loaded, [image], [args.caption], prompt=args.prompt)
    return loaded, image, batch


def run_gradients(args) -> None:
    loaded, image, batch = _load(args)
    flow = gradient_flow(loaded.model, batch)
    output = Path(args.output)
    plot_gradient_maps(
        image, {f"{loaded.connector}": (flow.patch_maps[0], flow.layer_norms[0].tolist())}, output, caption=args.caption
    )
    report = {
        "checkpoint": str(args.checkpoint),
        "adapter": args.adapter,
        "image": str(args.image),
        "caption": args.caption,
        "prompt": args.prompt,
        "connector": loaded.connector,
        **flow.to_dict(0),
    }
    write_file(output.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    print(f"caption loss {report['loss']:.4f}; gradient L2 norm per vision layer (first -> last):")
    for entry in report["layers"]:
        print(f"  layer {entry['layer']:>3}  {entry['grad_norm']:.4e}")
    print(f"written: {output} and {output.with_suffix('.json')}")


def run_attention(args) -> None:
    loaded, image, batch = _load(args)
    if not loaded.model.hive_connector.uses_cross_attention:
        raise SystemExit(
            f"hive-analyze attention: this is a {loaded.connector!r} model, which has no cross-attention to show"
        )
    maps = cross_attention_maps(loaded.model, batch)
    token_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    positions = produced_positions(loaded.tokenizer, token_ids, labels, args.token, args.max_tokens)
    chosen = torch.stack([maps.predicting(position) for position in positions])  # (tokens, blocks, grid_h, grid_w)
    words = [token_text(loaded.tokenizer, token_ids[position]) for position in positions]
    output = Path(args.output)
    plot_attention_maps(
        image, chosen, row_labels=[f"-> {word}" for word in words], llm_layers=maps.llm_layers, path=output
    )
    report = {
        "checkpoint": str(args.checkpoint), "adapter": args.adapter, "image": str(args.image), "caption": args.caption,
        "llm_layers": maps.llm_layers, "grid": list(chosen.shape[-2:]),
        "tokens": [
            {"position": position, "token": word, "maps": chosen[row].tolist()}
            for row, (position, word) in enumerate(zip(positions, words, strict=True))
        ],
    }  # fmt: skip
    write_file(output.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(report)))
    print(f"cross-attention of {len(positions)} token(s) over {len(maps.llm_layers)} HIVE layers {maps.llm_layers}")
    print(f"written: {output} and {output.with_suffix('.json')}")


def main(argv: list[str] | None = None) -> None:
    quiet_progress_bars(reloads_models=True)
    parser = FullFlagParser(prog="hive-analyze", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("gradients", "per-layer gradient maps of the caption loss at the vision encoder (PNG + JSON)"),
        ("attention", "head-averaged cross-attention of text tokens over the image, per HIVE layer (PNG + JSON)"),
    ):
        command = commands.add_parser(name, help=helptext, description=helptext)
        command.add_argument("checkpoint", help="HIVE checkpoint directory (or the base model, with --adapter)")
        command.add_argument("image", help="an image file")
        command.add_argument("caption", help="the text whose loss / attention is analysed")
        command.add_argument("--adapter", default=None, help="a HIVE adapter directory on the base model CKPT")
        command.add_argument("--prompt", default="", help="text before the caption, as in training (not scored)")
        command.add_argument("--output", default=None, help=f"PNG to write (default hive_{name}.png); JSON next to it")
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if name == "attention":
            command.add_argument("--token", default=None, help="show only where the model looks to produce this word")
            command.add_argument(
                "--max_tokens", type=int, default=16, help="at most this many caption tokens (default 16)"
            )
    args = parser.parse_args(argv)
    args.output = args.output or f"hive_{args.command}.png"
    try:
        for path in (Path(args.output), Path(args.output).with_suffix(".json")):  # before any model is loaded
            output_file(path)
    except OutputRefused as error:
        parser.error(str(error))
    (run_gradients if args.command == "gradients" else run_attention)(args)


if __name__ == "__main__":
    main()
