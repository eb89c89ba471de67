"""Tiny randomly initialised models and a word-level tokenizer, written to disk like hub checkpoints.

For the demo, the tests and `hive-reproduce`: nothing is downloaded. The directories they write are
exactly what `hive-train --vision_model DIR --language_model DIR` reads for real models (a SigLIP
vision encoder with its image processor; a Llama causal LM with its tokenizer). `--pretrain` (or
`hive_adapter.tools.toy_pretraining`) pre-trains them the way real checkpoints come, which HIVE assumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, SiglipVisionConfig, SiglipVisionModel

from ..utils.outputs import OutputRefused, staged_directory

if TYPE_CHECKING:
    from .toy_pretraining import ToyPretraining

PRETRAINING_RECORD = "pretraining.json"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over `words` plus the special tokens."""
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


@dataclass(frozen=True)
class ToySizes:
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 8
    text_width: int = 96
    text_layers: int = 4


def write_toy_models(
    directory: str | Path,
    words: list[str],
    *,
    sizes: ToySizes = ToySizes(),
    seed: int = 0,
    pretraining: ToyPretraining | None = None,
):
    """Write `directory/vision` (SigLIP + image processor) and `directory/language` (Llama + tokenizer); with
    `pretraining`, pre-trained before they are put in place (loss curves in `directory/pretraining.json`, `PRETRAINING_RECORD`).

    `directory` must be new, empty, or an earlier output of this function (replaced whole): nothing else is
    ever overwritten (`hive_adapter.utils.outputs`)."""
    with staged_directory(directory, command="hive-toy", replace=True) as tmp:
        _write_toy_models(tmp, words, sizes=sizes, seed=seed)
        if pretraining is not None:
            from .toy_pretraining import pretrain_toy_models

            curves = pretrain_toy_models(tmp, pretraining, seed=seed)
            record = {"seed": seed, "settings": asdict(pretraining), "losses": curves}
            (tmp / PRETRAINING_RECORD).write_text(json.dumps(record, indent=1))
    return Path(directory) / "vision", Path(directory) / "language"


def _write_toy_models(directory: Path, words: list[str], *, sizes: ToySizes, seed: int) -> None:
    try:  # transformers 5: the PIL backend by name (the plain name wants torchvision, else warns and falls back)
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:  # transformers 4
        from transformers import SiglipImageProcessor

    torch.manual_seed(seed)
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=sizes.vision_width,
            intermediate_size=2 * sizes.vision_width,
            num_hidden_layers=sizes.vision_layers,
            num_attention_heads=4,
            image_size=sizes.image_size,
            patch_size=sizes.patch_size,
        )
    )
    vision.save_pretrained(directory / "vision")
    SiglipImageProcessor(
        size={"height": sizes.image_size, "width": sizes.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(directory / "vision")
    tokenizer = word_tokenizer(words)
    language = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=sizes.text_width,
            intermediate_size=2 * sizes.text_width,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    language.save_pretrained(directory / "language")
    tokenizer.save_pretrained(directory / "language")


def main(argv: list[str] | None = None) -> None:
    """`python -m hive_adapter.tools.toy_models DIR`: tiny stand-ins for a vision encoder and an LM checkpoint."""
    from ..data.synthetic import caption_vocabulary
    from ..utils.flags import FullFlagParser
    from .toy_pretraining import ToyPretraining

    parser = FullFlagParser(prog="python -m hive_adapter.tools.toy_models", description=main.__doc__)
    parser.add_argument("directory", help="writes DIR/vision and DIR/language")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="pre-train them (~2 min on one core): the LM on caption text, the encoder image-text contrastive",
    )
    args = parser.parse_args(argv)
    try:
        vision, language = write_toy_models(
            args.directory,
            caption_vocabulary(),
            seed=args.seed,
            pretraining=ToyPretraining() if args.pretrain else None,
        )
    except OutputRefused as error:
        parser.exit(2, f"{parser.prog}: refused: {error}\n")
    if args.pretrain:
        curves = json.loads((Path(args.directory) / PRETRAINING_RECORD).read_text())["losses"]
        print(
            f"pre-trained: LM loss {curves['language'][0]:.2f} -> {curves['language'][-1]:.2f}, "
            f"encoder contrastive loss {curves['vision'][0]:.2f} -> {curves['vision'][-1]:.2f}"
        )
    print(f"vision encoder: {vision}\nlanguage model: {language}")


if __name__ == "__main__":
    main()
