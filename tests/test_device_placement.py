"""Tensors that meet across devices (issue 42, finding 4): pixels read on the CPU with the model on a GPU, a
multi-GPU `device_map` placing decoder layers away from where the prompt was read. `meta` stands in for the other
device: an operation mixing devices fails there as it fails on CUDA."""

import torch

from hive_adapter.model.attach import HiveBlockCall
from hive_adapter.model.context import HiveVisionContext
from hive_adapter.model.layout import ImageSlots
from hive_adapter.model.runtime import HiveRuntime


def test_unusable_images_are_dropped_where_the_slots_live():
    """`usable` is computed where the pixels arrived (CPU), the slots live on the model's device."""
    index = torch.zeros(2, 1, dtype=torch.long, device="meta")
    slots = ImageSlots(index, torch.ones(2, 1, dtype=torch.bool, device="meta"), index)
    assert slots.without(torch.tensor([True, False])).image_valid.device.type == "meta"


def test_a_block_on_another_device_gets_its_inputs_on_its_own_device():
    """The context lives where the prompt was read (CPU); the decoder layer, and its hidden states, elsewhere."""
    context = HiveVisionContext(
        levels=[torch.randn(2, 4, 8)],
        image_valid=torch.ones(2, 1, dtype=torch.bool),
        marker_positions=torch.zeros(2, 1, dtype=torch.long),
        tokens_per_image=4,
        prompt_length=5,
    )
    runtime = HiveRuntime()
    call = HiveBlockCall(block=lambda: None, block_index=0, level_index=0, runtime=runtime)
    hidden = torch.empty(2, 5, 8, device="meta")
    with runtime.forward_scope(context):
        media, visible, has_media = call.inputs(hidden)
    assert {media.device.type, visible.device.type, has_media.device.type} == {"meta"}
    assert visible.shape == (2, 5, 4) and has_media.shape == (2, 5)
