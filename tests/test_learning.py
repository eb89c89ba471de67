"""Every connector learns to read the picture: tiny real models learn image-only tasks from scratch.

A square of one of 8 colours sits at a random spot of a 32 px image. `colour` asks for its colour,
`position` for its quadrant (its colour is a distractor): the answer is one token that only the image
determines, so a text prior is at chance. Each connector (a tiny SigLIP tower, a tiny Llama LM, the real
HiveForConditionalGeneration) must reach high accuracy on held-out images, and with each image swapped for
the next sample's it must fall to chance: what it learned is in the picture, not in an image-independent
offset. This fails if the gates never open, if the image never reaches the LM, or if positions are lost.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

import hive_adapter as hive
from hive_adapter.analysis import aligned_logits

IMAGE, PATCH, SQUARE = 32, 8, 8
PALETTE = torch.tensor(
    [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, 1], [-1, -1, -1]],
    dtype=torch.float32,
)  # 8 colours in the processor's [-1, 1] range; the background is 0 (grey)
PAD, BOS, ASK_COLOUR, ASK_POSITION = 0, 1, 2, 3
COLOUR_TOKENS = 4 + torch.arange(8)
QUADRANT_TOKENS = 12 + torch.arange(4)  # top left, top right, bottom left, bottom right
VOCAB = 16
TASKS = {"colour": (ASK_COLOUR, 8), "position": (ASK_POSITION, 4)}  # question token, answers
STEPS, BATCH, LEARNING_RATE = 250, 32, 1e-3


def square_task(task: str, count: int, seed: int) -> dict[str, torch.Tensor]:
    """`count` images with one square each, and [BOS, question, answer] texts that learn only the answer."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 8, (count,), generator=generator)
    quadrants = torch.randint(0, 4, (count,), generator=generator)
    # a random spot inside the quadrant: the square never straddles two
    offsets = torch.randint(0, IMAGE // 2 - SQUARE + 1, (count, 2), generator=generator)
    tops = (quadrants // 2) * (IMAGE // 2) + offsets[:, 0]
    lefts = (quadrants % 2) * (IMAGE // 2) + offsets[:, 1]
    pixels = torch.zeros(count, 3, IMAGE, IMAGE)
    for index in range(count):
        top, left = int(tops[index]), int(lefts[index])
        pixels[index, :, top : top + SQUARE, left : left + SQUARE] = PALETTE[colours[index]][:, None, None]
    question, _ = TASKS[task]
    answers = COLOUR_TOKENS[colours] if task == "colour" else QUADRANT_TOKENS[quadrants]
    input_ids = torch.stack([torch.full((count,), BOS), torch.full((count,), question), answers], 1)  # (count, 3)
    labels = input_ids.clone()
    labels[:, :2] = -100
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}


def tiny_model(connector: str, seed: int = 0) -> hive.HiveForConditionalGeneration:
    torch.manual_seed(seed)
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE,
            patch_size=PATCH,
        )
    )  # fmt: skip
    language = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=PAD, pad_token_id=PAD,
        )
    )  # fmt: skip
    config = hive.HiveConfig(connector=connector, vision_layers=[1, 3], llm_layers=[0, 1])  # 16 patch tokens a level
    return hive.HiveForConditionalGeneration.from_vision_text(vision, language, config)


def rows(data: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: tensor[index] for name, tensor in data.items()}


@torch.no_grad()
def answer_accuracy(model, data: dict[str, torch.Tensor]) -> float:
    predicted = aligned_logits(model, data)[:, 1].argmax(-1)  # position 1 predicts the answer
    return float((predicted == data["input_ids"][:, 2]).float().mean())


def train(model, data: dict[str, torch.Tensor]) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    order = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        batch = rows(data, torch.randint(0, len(data["input_ids"]), (BATCH,), generator=order))
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("connector", ["hive", "cascaded", "concat"])
@pytest.mark.parametrize("task", ["colour", "position"])
def test_a_tiny_model_learns_what_is_in_the_picture_and_a_swapped_image_undoes_it(task, connector):
    model = tiny_model(connector)
    train(model, square_task(task, 2048, seed=0))
    held_out = square_task(task, 512, seed=1)
    swapped = {**held_out, "pixel_values": held_out["pixel_values"].roll(-1, 0)}  # sample i sees image i + 1
    chance = 1 / TASKS[task][1]
    real, control = answer_accuracy(model, held_out), answer_accuracy(model, swapped)
    assert real >= 0.9, f"{connector} learned {task} to {real:.1%} only (chance {chance:.1%})"
    assert control <= chance + 0.1, f"{connector} answers {control:.1%} with another sample's image: not reading it"
    if connector != "concat":
        gates = [p for name, p in model.named_parameters() if name.endswith("hive_attn_gate")]
        assert gates
        with torch.no_grad():  # the image arrives through the gates: closed again, the answer is at chance
            for gate in gates:
                gate.zero_()
        closed = answer_accuracy(model, held_out)
        assert closed <= chance + 0.1, f"{connector} answers {closed:.1%} with its gates closed: not through them"
