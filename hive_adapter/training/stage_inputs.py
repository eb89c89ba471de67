"""What a hive-train stage starts from: the composed stage-0 model, the training data (and whether it can teach
anything), and the previous stage's model and processor as the next stage loads them."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, set_seed

from ..data.collator import HiveCaptionCollator, with_pad_token
from ..data.conversations import ConversationDataset, SyntheticConversations, read_llava_instruct
from ..data.datasets import ImageCaptionDataset, read_records
from ..data.image_checks import check_images
from ..data.supervision import supervision_report
from ..data.synthetic import SyntheticShapes, checked_attributes
from ..model.loading import load_vision_encoder
from ..model.modeling_hive import HiveForConditionalGeneration
from ..model.processing_hive import HiveProcessor, llava_chat_template
from ..utils.console import say as console_say
from ..utils.outputs import install, start_partial
from .cli_arguments import COMMAND, DataArguments, ModelArguments
from .hive_flags import HiveArguments, hive_config_from
from .plan import STAGE_REPORT

say = partial(console_say, COMMAND)


# ---------------------------------------------------------------------- the model
def compose_stage0(model_args: ModelArguments, hive_args: HiveArguments, directory: Path, *, seed: int) -> None:
    """Vision encoder + LLM + fresh zero-gated HIVE modules (initialised from `seed`), saved as a HIVE checkpoint."""
    if not (model_args.vision_model and model_args.language_model):
        raise ValueError("pass --vision_model and --language_model, or --model_name_or_path of a HIVE checkpoint")
    set_seed(seed)
    vision = load_vision_encoder(model_args.vision_model)
    language = AutoModelForCausalLM.from_pretrained(model_args.language_model)
    model = HiveForConditionalGeneration.from_vision_text(vision, language, hive_config_from(hive_args))
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(model_args.tokenizer or model_args.language_model))
    image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor or model_args.vision_model)
    # Saved with every stage: AutoProcessor, pipeline("image-text-to-text") and hive-serve load it from there.
    processor = HiveProcessor.for_model(model, tokenizer=tokenizer, image_processor=image_processor)
    tmp = start_partial(directory, command=COMMAND)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    report = {
        "stage": 0,
        "connector": hive_args.vision_connector,
        "vision_model": str(Path(model_args.vision_model).resolve()),
        "language_model": str(Path(model_args.language_model).resolve()),
    }
    (tmp / STAGE_REPORT).write_text(json.dumps(report, indent=2))
    install(tmp, directory, command=COMMAND)
    say(f"composed the initial model in {directory}")


def load_stage_model(previous: Path, config, *, attn_implementation: str | None = None) -> HiveForConditionalGeneration:
    """The previous stage's model in float32 whatever dtype it was saved in (transformers 5 loads a checkpoint in its
    saved dtype: a bf16 stage would train bf16 weights with no float32 master copy; `--bf16` is mixed precision over
    float32 weights), with the attention kernel asked for reaching the language model and HIVE's blocks."""
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = HiveForConditionalGeneration.from_pretrained(previous, config=config, dtype=torch.float32, **extra)
    model.hive_follow_attn_implementation()
    return model


def marker_mode(processor: HiveProcessor, config):
    """The sft stage's processor and model config in marker mode: conversations hold no, one or several images,
    each at its `<image>` marker. A captioning-mode model (pre-training's default) takes the tokenizer's `<image>`
    token as its marker; the marker must already be one token of the tokenizer (the toy tokenizers have it; add
    it to a real LM's tokenizer, and resize the embeddings, before pre-training)."""
    if config.image_token_id is not None:
        return processor, config
    from ..model.processing_hive import DEFAULT_IMAGE_TOKEN

    marked = HiveProcessor(
        processor.image_processor, processor.tokenizer, chat_template=None, image_token=DEFAULT_IMAGE_TOKEN
    )
    if processor.chat_template != llava_chat_template(None):
        marked.chat_template = processor.chat_template  # a template the user chose stays theirs
    if marked.image_token_id >= config.text_config.vocab_size:
        raise ValueError(
            f"the marker {DEFAULT_IMAGE_TOKEN!r} (id {marked.image_token_id}) is outside the language model's "
            f"vocabulary of {config.text_config.vocab_size}; resize the model's embeddings for it before sft"
        )
    config.image_token_id = marked.image_token_id
    say(f"sft: the model reads images at the {DEFAULT_IMAGE_TOKEN!r} marker (id {marked.image_token_id}) from now on")
    return marked, config


# ---------------------------------------------------------------------- the data
def encoder_image_size(path: str | Path) -> int:
    """The input size of the vision encoder in `path` (a vision model or a HIVE checkpoint): the synthetic sets'."""
    config = AutoConfig.from_pretrained(path)
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 64)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def build_dataset(data_args: DataArguments, *, image_size: int, instruct: bool = False):
    """The training set (captions; conversations for `instruct`, the sft stage); the synthetic one is drawn at the
    vision encoder's input size."""
    synthetic = data_args.data_format == "synthetic" or (
        data_args.data_path is None and data_args.data_format == "auto"
    )
    if instruct:
        if synthetic:
            return SyntheticConversations(
                data_args.synthetic_size, seed=data_args.synthetic_seed, image_size=image_size
            )
        if data_args.data_path is None:
            raise ValueError("--stage sft: pass --data_path (LLaVA's instruction JSON) or --data_format synthetic")
        if data_args.data_format not in ("auto", "llava_instruct"):
            raise ValueError(
                f"--stage sft reads conversations: --data_format {data_args.data_format!r} is pre-training data; use "
                "llava_instruct (or auto) with LLaVA's instruction JSON"
            )
        if not Path(data_args.data_path).is_file():
            raise FileNotFoundError(f"--data_path {data_args.data_path}: no such file")
        folder = data_args.image_folder or str(Path(data_args.data_path).parent)
        # Every image opened and checked now, in parallel: a bad file stops the run before step 1 with every
        # entry that uses one named (or, with --skip_bad_images, those entries are left out and counted).
        dataset = ConversationDataset(read_llava_instruct(data_args.data_path), folder)
        return check_images(dataset, skip_bad_images=data_args.skip_bad_images)
    if data_args.data_format == "llava_instruct":
        raise ValueError(
            "--data_format llava_instruct is instruction data: it trains --stage sft, after the pre-training stages"
        )
    if synthetic:
        return SyntheticShapes(
            data_args.synthetic_size,
            seed=data_args.synthetic_seed,
            image_size=image_size,
            attributes=checked_attributes(data_args.synthetic_attributes),
        )
    if data_args.data_path is None:
        raise ValueError("pass --data_path (LLaVA JSON or JSONL) or --data_format synthetic")
    records = read_records(data_args.data_path, data_args.data_format)
    folder = data_args.image_folder or str(Path(data_args.data_path).parent)
    return ImageCaptionDataset(records, folder, skip_bad_images=data_args.skip_bad_images)


def check_supervision(dataset, tokenizer_source: str | Path, max_length: int) -> None:
    """Stop a run that cannot learn (every caption truncated away) before it starts; warn when many samples lose
    their captions."""
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(tokenizer_source))
    report = supervision_report(HiveCaptionCollator(tokenizer, None, max_length=max_length), dataset.texts())
    report.check()
    say(
        f"{report.samples:,} training samples, {report.supervised_tokens:,} caption tokens to learn from"
        + (f" ({report.without_labels:,} samples have none left)" if report.without_labels else "")
    )
