"""Vision readers: one class per encoder family turns that family's own pixel inputs into what HIVE's levels take.

Every family feeds its encoder differently: a plain ViT takes a batch of fixed-size images `(images, 3, H, W)`,
SigLIP2 NaFlex patchified pixels with `spatial_shapes`, Qwen2/2.5/3-VL one packed run of patches of every image
with `image_grid_thw`. A reader runs the family's own encoder once (its `output_hidden_states`, never a copy of
its code) and returns, per image, the hidden states of the chosen encoder layers on a patch grid plus a mask of
the real tokens (`ReadImages`). From there HIVE's levels, pooling and cross-attention are one code path.

A new family is one `VisionReader` subclass registered with `register_reader` (docs/ARCHITECTURE.md §6.1):

    @register_reader
    class MyReader(VisionReader):
        name = "mine"
        input_names = ("my_grid",)                     # the tower's inputs beside pixel_values
        @classmethod
        def accepts(cls, tower, family_config): ...    # is this tower (in this VLM) of my family?
        @classmethod
        def shape_of(cls, config): ...                 # depth, width, patch size
        def read(self, pixel_values, inputs, layers): ...  # -> ReadImages
        def dummy_inputs(self, device): ...            # one blank image in the family's format

Readers are tried newest registration first; `ViTReader`, today's path, takes every tower no other reader claims.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# The readers hive-adapter ships register themselves on import (the order here is their registration order).
from . import readers_anyres, readers_crops, readers_gemma4, readers_pixtral, readers_qwen, readers_tiles  # noqa: F401
from .reader_base import _READERS, ViTReader
from .reader_base import ReadImages as ReadImages
from .reader_base import VisionReader as VisionReader
from .reader_base import crops_as_keys as crops_as_keys
from .reader_base import register_reader as register_reader


def reader_for(tower: nn.Module, family_config: Any = None) -> VisionReader:
    """The reader of `tower`'s family (inside a VLM of config `family_config`): the first registered reader that
    accepts it, else the plain ViT one."""
    for reader in _READERS:
        if reader.accepts(tower, family_config):
            return reader(tower, family_config)
    return ViTReader(tower, family_config)
