"""`hive-train`'s command line: the model, data and stage arguments next to HiveArguments and the HF
TrainingArguments, and what `--deepspeed` may name.

Every flag is a dataclass field with its help text, so `hive-train --help` and the dataclasses are one source.
`explicit_flags` records what the user typed: a stage's Table 3 defaults apply only where no flag was given. So
flags are given in full: an abbreviation (`--learning_r`) is refused, naming the flag (`hive_adapter.utils.flags`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..data.synthetic import ATTRIBUTES
from ..utils.flags import refuse_abbreviations
from .hive_flags import HiveArguments

COMMAND = "hive-train"
DEEPSPEED_CONFIGS = Path(__file__).parent.parent / "deepspeed"  # hive_adapter/deepspeed/


@dataclass
class ModelArguments:
    vision_model: str | None = field(
        default=None,
        metadata={
            "help": "HF vision encoder directory (CLIP, SigLIP, SigLIP2, DINOv2, ...), or a saved vision-language "
            "model's (Qwen2.5-VL, SmolVLM, LLaVA, ...: its own encoder, with its weights)."
        },
    )
    language_model: str | None = field(default=None, metadata={"help": "HF causal LM directory (Llama, Qwen, ...)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from an existing HIVE checkpoint (e.g. out/stage1) instead of composing."},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer directory (default: the LM's)."})
    image_processor: str | None = field(
        default=None, metadata={"help": "Image processor directory (default: the vision encoder's)."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel of the language model and HIVE's cross-attention (default: transformers' "
            "choice, SDPA); flash_attention_2 needs CUDA and the flash-attn package.",
            "choices": ["sdpa", "eager", "flash_attention_2"],
        },
    )


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "LLaVA pre-training JSON or JSONL of {image, text}; for --stage sft LLaVA's instruction JSON "
            "(llava_v1_5_mix665k.json layout); omit with --data_format synthetic."
        },
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the data file's image paths are relative to."}
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": "auto | llava | jsonl | llava_instruct | synthetic (auto: llava_instruct for --stage sft, else "
            "llava or jsonl by the file's suffix; synthetic: captions, or conversations for --stage sft)."
        },
    )
    synthetic_size: int = field(default=2000, metadata={"help": "Samples in the built-in synthetic shapes set."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic set."})
    synthetic_attributes: str = field(
        default=",".join(ATTRIBUTES),
        metadata={"help": "What synthetic captions name: a comma-separated subset of colour,texture,shape,position."},
    )
    max_text_length: int | None = field(
        default=None,
        metadata={
            "help": "Truncate text to this many tokens (default: 77 for pre-training, the paper's; 2048 for --stage "
            "sft, LLaVA-1.5's). A conversation that would lose an image marker is dropped, counted and named."
        },
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={
            "help": "Skip (and count) unreadable images instead of stopping with an error. For --stage sft every "
            "image is checked before step 1: without this flag the run stops naming every bad entry."
        },
    )
    drop_cut_conversations: bool = field(
        default=False,
        metadata={
            "help": "--stage sft: drop a conversation that --max_text_length would cut (losing later answers) whole, "
            "instead of training on its first part (counted and named either way)."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack each micro-batch's samples several to a row (position ids restart per sample, "
            "block-diagonal self-attention, each token's cross-attention on its own sample's images): no padding "
            "compute; the same loss and gradients as padded rows."
        },
    )
    packing_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per packed row with --packing (default: --max_text_length; at least that)."},
    )

    @property
    def packed_row_length(self) -> int | None:
        """Tokens per packed row, or None without --packing."""
        if not self.packing:
            if self.packing_length is not None:
                raise ValueError(f"--packing_length {self.packing_length} without --packing: add --packing")
            return None
        length = self.packing_length or self.max_text_length
        if length < self.max_text_length:
            raise ValueError(
                f"--packing_length {length}: shorter than --max_text_length {self.max_text_length} (a sample may "
                "have that many tokens); give at least that"
            )
        return length


@dataclass
class StageArguments:
    stage: str = field(
        default="all",
        metadata={
            "help": "1 | 2 | 3 | all (1 -> 2 -> 3) | an ascending list like 2,3 | sft (instruction tuning from a "
            "finished stage 3, LLaVA-1.5's fine-tuning settings)."
        },
    )
    global_batch_size: int | None = field(
        default=None, metadata={"help": "Samples per optimiser step over all ranks (default: Table 3, 256/256/1024)."}
    )
    verify_rank_consistency: bool = field(
        default=False,
        metadata={"help": "After each stage, check every rank holds identical weights (writes a report)."},
    )
    hive_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of HIVE's modules in the stages that also train the LLM (2 and 3); the LLM "
            "and the encoder keep the stage's (default: the stage's for everything, Table 3). Same warmup and "
            "cosine shape, decayed to the same fraction of its peak."
        },
    )
    vision_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the vision encoder in stage 3 (the stage that trains it; Table 3: the "
            "stage's 2e-6 for everything, which barely moves a pre-trained encoder). Same warmup and cosine shape."
        },
    )


def explicit_flags(argv: list[str]) -> set[str]:
    """Names of the options given on the command line (their values may equal the defaults)."""
    return {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}


def resolve_deepspeed(value: str | None) -> str | None:
    """`zero2`, `zero3`, `zero3_offload` (shipped with the package) or a path to a JSON config."""
    if value is None:
        return None
    shipped = DEEPSPEED_CONFIGS / f"{value}.json"
    if shipped.is_file():
        return str(shipped)
    if Path(value).is_file():
        return value
    names = sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json"))
    raise ValueError(f"--deepspeed {value!r}: neither a shipped config ({', '.join(names)}) nor a file")


def parse_arguments(argv: list[str]):
    parser = HfArgumentParser(
        (ModelArguments, HiveArguments, DataArguments, StageArguments, TrainingArguments), allow_abbrev=False
    )
    parser.prog = COMMAND
    # An abbreviation (`--learning_r`) would set its flag unseen by explicit_flags, and the stage's default would
    # overwrite it: refused, naming the full flag, before anything reads the typed flags.
    refuse_abbreviations(parser, argv)
    # `--deepspeed` is applied per stage, after stage 0 is composed without ZeRO-3 partitioning.
    argv = list(argv)
    deepspeed = None
    for index, arg in enumerate(argv):
        if arg == "--deepspeed" and index + 1 < len(argv):
            deepspeed = argv[index + 1]
            del argv[index : index + 2]
            break
        if arg.startswith("--deepspeed="):
            deepspeed = arg.split("=", 1)[1]
            del argv[index]
            break
    model_args, hive_args, data_args, stage_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return (
        model_args,
        hive_args,
        data_args,
        stage_args,
        training_args,
        resolve_deepspeed(deepspeed),
        explicit_flags(argv),
    )
