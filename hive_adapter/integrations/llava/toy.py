"""A tiny LLaVA setup on disk, shaped like the real one: `python -m hive_adapter.integrations.llava.toy DIR`.

* `DIR/clip`: a CLIP vision tower with its image processor (what `--vision_tower` points at);
* `DIR/vicuna`: a Llama causal LM with a SentencePiece `LlamaTokenizer` (byte fallback, legacy
  spacing, like Vicuna's), so LLaVA's conversation masking counts tokens exactly as it does for Vicuna;
* `DIR/data`: synthetic shape images, `pretrain.json` (LLaVA-Pretrain style, `--version plain`) and
  `finetune.json` (two-round `--version v1` conversations, like LLaVA-665K).

Nothing is downloaded; the same commands then run on the real checkpoints.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from ...data.datasets import llava_entry
from ...data.synthetic import COLOURS, POSITIONS, SHAPES, TEXTURES, SyntheticShapes
from ...utils.flags import FullFlagParser
from ...utils.outputs import OutputRefused, staged_directory

PRETRAIN_PROMPT = "Give a short description of the image."
QUESTION = "What is in the image?"
COLOUR_QUESTION = "What colour is the shape?"
# LLaVA's vicuna_v1 system prompt and roles: the tokenizer must have seen their characters.
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _corpus() -> list[str]:
    lines = [SYSTEM, "USER: ASSISTANT:", PRETRAIN_PROMPT, QUESTION, COLOUR_QUESTION]
    for colour in COLOURS:
        for shape in SHAPES:
            for texture in TEXTURES:
                lines.append(f"a {colour} {texture} {shape} in the {' '.join(POSITIONS)}")
    return lines


def write_sentencepiece_tokenizer(directory: Path, *, vocab_size: int = 400) -> None:
    """Train a small BPE SentencePiece model like LLaMA's (byte fallback, digits split, identity
    normalisation; unk/bos/eos = 0/1/2) and write it as a `LlamaTokenizer` checkpoint."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    # The files Vicuna ships (no tokenizer.json): each transformers version builds its own tokenizer from them.
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "model_max_length": 2048,
        "legacy": True,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def write_llava_toy(directory: str | Path, *, samples: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write the three folders; returns their paths (`clip`, `vicuna`, `data`, `pretrain`, `finetune`).

    `directory` must be new, empty, or an earlier output of this function (replaced whole)."""
    with staged_directory(directory, command="hive-llava-toy", replace=True) as tmp:
        _write_llava_toy(tmp, samples=samples, seed=seed)
    directory = Path(directory)
    return {
        "clip": directory / "clip",
        "vicuna": directory / "vicuna",
        "data": directory / "data",
        "pretrain": directory / "data" / "pretrain.json",
        "finetune": directory / "data" / "finetune.json",
    }


def _write_llava_toy(directory: Path, *, samples: int, seed: int) -> None:
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    image_size = 64
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=8,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            projection_dim=64,
        )
    )
    clip.save_pretrained(directory / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(directory / "clip")

    write_sentencepiece_tokenizer(directory / "vicuna")
    tokenizer = AutoTokenizer.from_pretrained(directory / "vicuna", use_fast=False)
    language = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    language.save_pretrained(directory / "vicuna")

    data = directory / "data"
    shapes = SyntheticShapes(samples, seed=seed, image_size=image_size)
    (data / "images").mkdir(parents=True, exist_ok=True)
    pretrain, finetune = [], []
    for index in range(samples):
        sample = shapes.sample(index)
        file = f"images/{index:05d}.png"
        shapes.image(index).save(data / file)
        pretrain.append(llava_entry(f"{index:05d}", file, [f"<image>\n{PRETRAIN_PROMPT}", sample.caption]))
        turns = [f"{QUESTION}\n<image>", sample.caption, COLOUR_QUESTION, sample.colour]  # two rounds, like LLaVA-665K
        finetune.append(llava_entry(f"{index:05d}", file, turns))
    (data / "pretrain.json").write_text(json.dumps(pretrain, indent=1))
    (data / "finetune.json").write_text(json.dumps(finetune, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(prog="python -m hive_adapter.integrations.llava.toy", description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="writes DIR/clip, DIR/vicuna and DIR/data")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_llava_toy(args.directory, samples=args.samples, seed=args.seed)
    except OutputRefused as error:
        parser.exit(2, f"{parser.prog}: refused: {error}\n")
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
