"""Every connector learns to read the picture: tiny real models learn image-only tasks from scratch.

The tasks and the tiny model are the learning curves' (`hive_adapter.analysis.learning_curves`): a square of one
of 8 colours at a random spot of a 32 px image; `colour` asks for its colour, `position` for its quadrant (its
colour is a distractor): the answer is one token that only the image determines, so a text prior is at chance.
Each connector (a tiny SigLIP tower, a tiny Llama LM, the real HiveForConditionalGeneration) must reach high
accuracy on held-out images, and with each image swapped for the next sample's it must fall to chance: what it
learned is in the picture, not in an image-independent offset. This fails if the gates never open, if the image
never reaches the LM, or if positions are lost.
"""

import pytest
import torch

from hive_adapter.analysis.learning_curves import ANSWERS, answer_accuracy, image_task, tiny_model

STEPS, BATCH, LEARNING_RATE = 250, 32, 1e-3


def train(model, data: dict[str, torch.Tensor]) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    order = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        index = torch.randint(0, len(data["input_ids"]), (BATCH,), generator=order)
        model(**{name: tensor[index] for name, tensor in data.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("connector", ["hive", "cascaded", "concat", "deepstack"])
@pytest.mark.parametrize("task", ["colour", "position"])
def test_a_tiny_model_learns_what_is_in_the_picture_and_a_swapped_image_undoes_it(task, connector):
    model = tiny_model(connector, seed=0)
    train(model, image_task(task, 2048, seed=0))
    held_out = image_task(task, 512, seed=1, held_out=True)
    swapped = {**held_out, "pixel_values": held_out["pixel_values"].roll(-1, 0)}  # sample i sees image i + 1
    chance = 1 / ANSWERS[task]
    real, control = answer_accuracy(model, held_out), answer_accuracy(model, swapped)
    assert real >= 0.9, f"{connector} learned {task} to {real:.1%} only (chance {chance:.1%})"
    assert control <= chance + 0.1, f"{connector} answers {control:.1%} with another sample's image: not reading it"
    if connector not in ("concat", "deepstack"):
        gates = [p for name, p in model.named_parameters() if name.endswith("hive_attn_gate")]
        assert gates
        with torch.no_grad():  # the image arrives through the gates: closed again, the answer is at chance
            for gate in gates:
                gate.zero_()
        closed = answer_accuracy(model, held_out)
        assert closed <= chance + 0.1, f"{connector} answers {closed:.1%} with its gates closed: not through them"
