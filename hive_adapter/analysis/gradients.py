"""Gradient flow into the vision encoder: how strongly, and where, the LM loss reaches each layer.

For an (image, caption) pair, the caption's next-token loss is differentiated with respect to the
output hidden states of every vision-encoder layer (supplementary §9.1, Figures 5-11). Per layer this
gives a per-patch map (the L2 norm of the gradient at each patch) and one number (the gradient's L2
norm over the patches). The paper's claim, measurable here: under HIVE the early layers get a
stronger and more localised signal than under `cascaded` or `concat`, where it must pass back
through every layer above them.

Raw norms scale with how sharp each model's loss is, which differs between connectors and checkpoints.
The same loss is therefore also differentiated at the LM's input embeddings of the text tokens:
`relative_norms` (encoder layer over text input) compares how much of the LM's signal reaches the
encoder, whatever the loss scale.

Works for every connector (`hive`, `cascaded`, `concat`), for `HiveForConditionalGeneration` and
`HiveModel` alike. The model's own parameters are not touched (no `.grad` is written).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.levels import prefix_length
from .captioning import aligned_logits, per_sample_caption_loss


@dataclass
class GradientFlow:
    """Gradients of the caption loss at the output of each vision-encoder layer, for a batch of images.

    patch_maps: (images, layers, grid_h, grid_w) per-patch gradient L2 norm; layer_norms: (images,
    layers) gradient L2 norm over each layer's patch tokens; layer 1 is the first encoder layer.
    """

    patch_maps: torch.Tensor
    layer_norms: torch.Tensor
    losses: torch.Tensor  # (images,) caption loss per image
    text_input_norms: torch.Tensor | None = None  # (images,) gradient L2 norm at the text tokens' input embeddings

    @property
    def relative_norms(self) -> torch.Tensor:
        """(images, layers) each layer's gradient norm over the gradient norm at the LM's text input embeddings."""
        if self.text_input_norms is None:
            raise ValueError("this GradientFlow holds no text-input gradient norms")
        return self.layer_norms / self.text_input_norms[:, None].clamp(min=1e-30)

    @property
    def num_layers(self) -> int:
        return self.layer_norms.shape[1]

    def object_share(self, masks: torch.Tensor) -> torch.Tensor:
        """(images, layers) share of each layer's squared gradient that falls on the object.

        masks: (images, height, width) in [0, 1], 1 on the object (any resolution; averaged onto the
        patch grid, so a patch counts by how much of it the object covers).
        """
        grid = self.patch_maps.shape[-2:]
        coverage = F.adaptive_avg_pool2d(masks[:, None].float(), grid)  # (images, 1, grid_h, grid_w)
        energy = self.patch_maps.float() ** 2
        return (energy * coverage).flatten(2).sum(-1) / energy.flatten(2).sum(-1).clamp(min=1e-30)

    def to_dict(self, index: int = 0) -> dict:
        """One image's numbers, JSON-ready."""
        return {
            "loss": float(self.losses[index]),
            "grid": list(self.patch_maps.shape[-2:]),
            "layers": [
                {"layer": layer + 1, "grad_norm": float(self.layer_norms[index, layer])}
                for layer in range(self.num_layers)
            ],
        }


@contextmanager
def _parameters_frozen(model: torch.nn.Module):
    """No parameter gradients for the duration: only the input (and what follows from it) is differentiated."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def gradient_flow(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> GradientFlow:
    """Differentiate each sample's caption loss (mean over its caption tokens) at every encoder layer.

    batch: as `caption_batch` builds it (`input_ids`, `attention_mask`, `labels`, `pixel_values`), one
    image per sample. Samples do not interact: image i's maps are those it would get on its own.
    """
    if batch.get("pixel_values") is None:
        raise ValueError("gradient_flow needs pixel_values: the gradients are taken at the vision encoder")
    if batch["pixel_values"].ndim != 4:
        raise ValueError(
            f"pixel_values of shape {tuple(batch['pixel_values'].shape)}: gradient maps need images as "
            "(images, channels, height, width) (fixed-resolution encoders; patchified NaFlex inputs are not mapped)"
        )
    tower = model.hive_vision.tower
    captured: list[tuple[torch.Tensor, ...]] = []
    text_inputs: list[torch.Tensor] = []

    def differentiable_text_input(module, args, output):
        # The parameters are frozen, so the embedding output is a constant: make it a leaf that collects its
        # gradient (the values, and everything computed from them, are unchanged).
        leaf = output.detach().requires_grad_(True)
        text_inputs.append(leaf)
        return leaf

    def keep_hidden_states(module, args, output):
        states = output.hidden_states
        if states is None:
            raise RuntimeError(
                f"{type(module).__name__} returned no hidden_states; HIVE calls it with output_hidden_states=True"
            )
        for state in states:
            state.retain_grad()
        captured.append(states)

    pixel_values = batch["pixel_values"].detach().clone().requires_grad_(True)
    was_training = model.training
    model.eval()
    handles = [
        tower.register_forward_hook(keep_hidden_states),
        model.get_input_embeddings().register_forward_hook(differentiable_text_input),
    ]
    try:
        with torch.enable_grad(), _parameters_frozen(model):
            logits = aligned_logits(model, {**batch, "pixel_values": pixel_values})
            losses = per_sample_caption_loss(logits, batch["labels"])
            losses.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if len(captured) != 1:
        raise RuntimeError(f"the vision tower ran {len(captured)} times in one forward; expected once")
    states = captured[0][1:]  # hidden_states[0] is the embedding output; [k] is layer k's output
    patch = model.hive_vision_shape.patch_size
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    maps = []
    for state in states:
        grad = state.grad if state.grad is not None else torch.zeros_like(state)
        grad = grad[:, prefix_length(grad.shape[1], grid) :]  # drop CLS / register tokens
        maps.append(grad.float().norm(dim=-1).reshape(grad.shape[0], *grid))  # (images, grid_h, grid_w)
    patch_maps = torch.stack(maps, 1)  # (images, layers, grid_h, grid_w)
    layer_norms = patch_maps.flatten(2).norm(dim=-1)  # (images, layers)
    if len(text_inputs) != 1 or text_inputs[0].grad is None:
        raise RuntimeError(f"the LM's input embeddings ran {len(text_inputs)} times or got no gradient; expected once")
    text_grad = text_inputs[0].grad  # (images, text, width)
    if batch.get("attention_mask") is not None:
        text_grad = text_grad * batch["attention_mask"][..., None].to(text_grad.dtype)  # padding dropped
    return GradientFlow(
        patch_maps=patch_maps.detach(),
        layer_norms=layer_norms.detach(),
        losses=losses.detach(),
        text_input_norms=text_grad.flatten(1).norm(dim=-1).detach(),  # (images,)
    )
