"""TRL's `SFTTrainer` instruction-tunes a `HiveForConditionalGeneration` (issue 28, item 3).

Real TRL classes throughout (trl pinned in requirements/constraints.txt): `SFTTrainer` with a `HiveProcessor` as
its processing class and a conversational image dataset in TRL's VLM format (`{"messages": [...], "images":
[...]}`), TRL's own `DataCollatorForVisionLanguageModeling` with `assistant_only_loss=True` (the processor's chat
template marks the assistant turns with `{% generation %}`), TRL's fused LM head (it calls `model.base_model`,
which a HIVE model answers with `HiveBackbone`), plain and with a PEFT `LoraConfig`.

The task is learnable only through the image: a single-colour picture, the question "what colour is it ?", the
colour word as the answer. The language model alone can do no better than chance among the four colours (loss ln 4 on
the colour token); the tests ask for clearly less, and for the right answer from `generate` after training.
"""

import math

import pytest
import torch
from datasets import Dataset
from hive_checkpoints import SIZES, VISION_LAYERS
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from trl import SFTConfig, SFTTrainer

import hive_adapter as hive
from hive_adapter.data.synthetic import COLOURS, caption_vocabulary
from hive_adapter.model.loading import load_vision_encoder
from hive_adapter.tools.toy_models import write_toy_models

QUESTION = "what colour is it ?"
ANSWERS = ("red", "green", "blue", "yellow")  # of hive_adapter.data.synthetic.COLOURS: four far apart
# the template's role words and the question are real tokens of the toy tokenizer (not <unk>)
WORDS = [*caption_vocabulary(), *QUESTION.split(), "USER:", "ASSISTANT:"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_models(tmp_path_factory.mktemp("toy"), WORDS, sizes=SIZES)


def fresh_model_and_processor(toy, **overrides):
    """A HIVE model composed from the toy encoder and LM (marker mode: `<image>`, unless overridden), and its
    processor."""
    vision_dir, language_dir = toy
    tokenizer = AutoTokenizer.from_pretrained(language_dir)
    torch.manual_seed(0)
    marker = tokenizer.convert_tokens_to_ids("<image>")
    settings = dict(vision_layers=VISION_LAYERS, llm_layers=[0, 1], tokens_per_level=4, image_token_id=marker)
    config = hive.HiveConfig(**{**settings, **overrides})
    model = hive.HiveForConditionalGeneration.from_vision_text(
        load_vision_encoder(vision_dir), AutoModelForCausalLM.from_pretrained(language_dir), config
    )
    processor = hive.HiveProcessor.for_model(
        model, tokenizer=tokenizer, image_processor=AutoImageProcessor.from_pretrained(vision_dir)
    )
    return model, processor


def conversation(colour):
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": colour}]},
    ]


def colour_dataset(samples=48):
    """TRL's conversational VLM format: an `images` column and a `messages` column, `{"type": "image"}`
    placeholders in the user turn (TRL fills them from `images`)."""
    colours = [ANSWERS[i % len(ANSWERS)] for i in range(samples)]
    rows = [{"images": [Image.new("RGB", (32, 32), COLOURS[c])], "messages": conversation(c)} for c in colours]
    return Dataset.from_list(rows)


def sft_config(output_dir, **overrides):
    """TRL's defaults except: CPU float32 (TRL turns bf16 on by default), a learning rate for a tiny model, the
    loss on the assistant's tokens only, no checkpoints on the way."""
    settings = dict(
        output_dir=str(output_dir),
        max_steps=40,
        per_device_train_batch_size=6,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=5,
        assistant_only_loss=True,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    return SFTConfig(**{**settings, **overrides})


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def colour_answers(model, processor):
    """Greedy answers to the question, one solid image per colour."""
    model.eval()
    answers = {}
    for colour in ANSWERS:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[Image.new("RGB", (32, 32), COLOURS[colour])], text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        answers[colour] = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    return answers


def logits_of(model, processor, colour="blue"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (32, 32), COLOURS[colour])], text=prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------- the labels TRL's collator builds
def test_trls_collator_puts_the_loss_on_the_assistants_tokens_only(toy, tmp_path):
    """A hand-written two-turn conversation through the collator SFTTrainer builds: every label is -100 except
    the assistant's words and the EOS that ends each assistant turn (inside the template's generation block)."""
    model, processor = fresh_model_and_processor(toy)
    image = Image.new("RGB", (32, 32), COLOURS["red"])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "describe the image ."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
    ]
    dataset = Dataset.from_list([{"images": [image], "messages": messages}])
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=dataset, processing_class=processor)
    batch = trainer.data_collator([dataset[0]])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens == (
        ["<bos>", "USER:", "<image>", *QUESTION.split(), "ASSISTANT:", "red", "<eos>"]
        + ["USER:", "describe", "the", "image", ".", "ASSISTANT:", "a", "red", "square", "<eos>"]
    )
    learned = [token for token, label in zip(tokens, batch["labels"][0].tolist(), strict=True) if label != -100]
    assert learned == ["red", "<eos>", "a", "red", "square", "<eos>"]
    kept = batch["labels"][0] != -100
    assert torch.equal(batch["labels"][0][kept], batch["input_ids"][0][kept])
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("connector", "marker"), [("hive", True), ("cascaded", True), ("concat", True), ("hive", False), ("concat", False)]
)
def test_trls_fused_lm_head_gives_the_models_own_loss(toy, tmp_path, connector, marker):
    """SFTTrainer's loss is TRL's fused LM head on `model.base_model` (`HiveBackbone`): equal to the model's own
    loss on the same batch, for every connector. `concat` splices the images' tokens into the sequence; its
    backbone gathers the hidden states back to the input's columns so they line up with TRL's labels. The batch
    mixes an image before the text, an image after text, and right padding; in marker mode and in captioning
    mode (no marker: the template renders an image as nothing, every token sees the sample's image)."""
    overrides = {} if marker else {"image_token_id": None}
    model, processor = fresh_model_and_processor(toy, connector=connector, gate_init=0.5, **overrides)
    red, blue = (Image.new("RGB", (32, 32), COLOURS[c]) for c in ("red", "blue"))
    after_text = [
        {"role": "user", "content": [{"type": "text", "text": "describe the image ."}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a blue square"}]},
    ]
    dataset = Dataset.from_list(
        [{"images": [red], "messages": conversation("red")}, {"images": [blue], "messages": after_text}]
    )
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=dataset, processing_class=processor)
    batch = trainer.data_collator([dataset[0], dataset[1]])
    assert (batch["attention_mask"] == 0).any()  # the rows differ in length
    trainer.model.train()
    fused = trainer.model(**batch, fused_lm_head=True)
    own = trainer.model(**batch)
    assert torch.allclose(fused.loss, own.loss, atol=1e-5), (fused.loss, own.loss)
    # Every text token learned too, so the token after each image counts, predicted from the image's position.
    # Not the markers, nor the first token: concat has no hidden state that predicts those (its image takes the
    # marker's place; in captioning mode its own loss predicts the first token from the image in front).
    markers = batch["input_ids"] == (processor.image_token_id if marker else -1)
    everything = batch["input_ids"].masked_fill((batch["attention_mask"] == 0) | markers, -100)
    everything[:, 0] = -100
    full = {**batch, "labels": everything}
    assert torch.allclose(trainer.model(**full, fused_lm_head=True).loss, trainer.model(**full).loss, atol=1e-5), (
        connector
    )
    fused.loss.backward()
    assert all(param.grad is not None for param in model.hive_levels.parameters())


# ---------------------------------------------------------------------- training, saving, reloading
def test_sft_trainer_trains_saves_and_reloads_a_hive_model(toy, tmp_path):
    """From a saved HIVE directory with its processor (what every hive-train stage writes), as the instruction-tuning guide (docs/guides/instruction-tune.md) shows."""
    composed, composed_processor = fresh_model_and_processor(toy)
    composed.save_pretrained(tmp_path / "start")
    composed_processor.save_pretrained(tmp_path / "start")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "start")
    processor = AutoProcessor.from_pretrained(tmp_path / "start")
    trainer = SFTTrainer(
        model=model, args=sft_config(tmp_path / "run"), train_dataset=colour_dataset(), processing_class=processor
    )
    assert trainer.args.gradient_checkpointing  # TRL's default, kept
    trainer.train()
    curve = losses(trainer)
    # The loss is the mean over the colour word and EOS. Blind to the image, the best a model can do is ln 4 on
    # the colour and 0 on EOS: ln(4) / 2. Well below that, the answers come from the pictures.
    assert curve[-1] < curve[0] / 4 and curve[-1] < 0.5 * math.log(len(ANSWERS)) / 2, curve
    assert colour_answers(trainer.model, processor) == {colour: colour for colour in ANSWERS}

    directory = tmp_path / "saved"
    trainer.save_model(str(directory))
    reloaded = AutoModelForImageTextToText.from_pretrained(directory)
    assert isinstance(reloaded, hive.HiveForConditionalGeneration)
    trained = trainer.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert torch.equal(logits_of(reloaded, processor), logits_of(trainer.model, processor))
    again = AutoProcessor.from_pretrained(directory)
    assert isinstance(again, hive.HiveProcessor) and again.image_token == "<image>"
    assert again.chat_template == processor.chat_template
    assert colour_answers(reloaded, again) == {colour: colour for colour in ANSWERS}


# ---------------------------------------------------------------------- LoRA through SFTTrainer's peft_config
def test_sft_trainer_with_lora_trains_hives_modules_and_the_adapter_reloads(toy, tmp_path):
    """LoRA on the language model's attention; HIVE's own modules are new (gates at 0), so they train whole:
    `modules_to_save=model.hive_modules_to_save()`. The adapter directory holds both and loads onto a fresh
    base with PEFT; merged, it is a plain HIVE model again."""
    from peft import LoraConfig, PeftModel

    model, processor = fresh_model_and_processor(toy)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=r".*language_model.*\.(q_proj|v_proj)",
        # HIVE's modules; and the LM head, because the toy language model is random (its head near zero cannot
        # say anything with conviction, where a pre-trained LM's already names colours)
        modules_to_save=[*model.hive_modules_to_save(), "lm_head"],
    )
    assert model.hive_modules_to_save() == ["hive_levels", "hive_blocks.0", "hive_blocks.1"]
    trainer = SFTTrainer(
        model=model,
        args=sft_config(tmp_path / "run"),
        train_dataset=colour_dataset(),
        processing_class=processor,
        peft_config=lora,
    )
    trainable = [name for name, param in trainer.model.named_parameters() if param.requires_grad]
    assert all(".lora_" in name or ".modules_to_save.default." in name for name in trainable), trainable
    assert any("hive_blocks.0.modules_to_save.default.hive_attn_gate" in name for name in trainable)
    assert not any("vision_model" in name for name in trainable)
    trainer.train()
    curve = losses(trainer)
    assert curve[-1] < curve[0] / 4 and curve[-1] < 0.5 * math.log(len(ANSWERS)) / 2, curve
    assert colour_answers(trainer.model, processor) == {colour: colour for colour in ANSWERS}
    trained_logits = logits_of(trainer.model, processor)

    directory = tmp_path / "adapter"
    trainer.save_model(str(directory))
    assert (directory / "adapter_model.safetensors").is_file() and not (directory / "model.safetensors").exists()
    assert isinstance(AutoProcessor.from_pretrained(directory), hive.HiveProcessor)
    base, _ = fresh_model_and_processor(toy)  # the same base (seeded); HIVE's trained modules come from the adapter
    reloaded = PeftModel.from_pretrained(base, directory)
    assert torch.equal(logits_of(reloaded, processor), trained_logits)

    merged = reloaded.merge_and_unload()
    assert isinstance(merged, hive.HiveForConditionalGeneration)
    merged.save_pretrained(tmp_path / "merged")
    standalone = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits_of(standalone, processor), trained_logits, atol=1e-5)
    assert colour_answers(standalone, processor) == {colour: colour for colour in ANSWERS}


def test_a_block_peft_keeps_in_modules_to_save_runs_as_its_trainable_copy(toy):
    """PEFT puts a `ModulesToSaveWrapper` where each listed module was; the decoder layers' hooks look the block
    up each call, so the copy that trains is the one that runs (not the frozen original)."""
    from peft import LoraConfig, get_peft_model

    model, processor = fresh_model_and_processor(toy, gate_init=0.5)
    lora = LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj", modules_to_save=model.hive_modules_to_save())
    peft_model = get_peft_model(model, lora)
    messages = conversation("red")
    text = processor.apply_chat_template(messages)
    inputs = processor(images=[Image.new("RGB", (32, 32), COLOURS["red"])], text=text, return_tensors="pt")
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for index in model.hive_blocks:
        wrapper = model.hive_blocks[index]
        assert wrapper.modules_to_save["default"].hive_attn_gate.grad.abs().item() > 0
        assert wrapper.original_module.hive_attn_gate.grad is None
    levels = model.hive_levels.modules_to_save["default"]
    assert all(param.grad is not None for param in levels.parameters())
