"""The connectors that splice image tokens into the language model's input: `concat`, LLaVA's (the self-attention
baseline), and `deepstack`, Qwen3-VL's (concat's splice, and each shallower level added to the first decoder
layers' outputs at the image tokens, `deepstack.py`). Registered by `connectors.py`."""

from __future__ import annotations

import inspect

import torch

from .connector_base import Connector
from .deepstack import added_after_layers
from .layer_choice import LayerRequest, ResolvedLayers
from .packing import check_packed_language_model, flash_packing_kwargs, packed_segments
from .runtime import past_length_of
from .splice import splice_image_tokens, splice_packed


class ConcatConnector(Connector):
    """The self-attention baseline: the deepest selected level projected and spliced into the LLM input at the
    image marker, as LLaVA does (`splice.py`). No cross-attention. Every resolved level before the deepest (none
    for concat; `DeepStackConnector`'s) is spliced likewise into zeros and added after decoder layer k
    (`deepstack.py`)."""

    name = "concat"
    uses_cross_attention = False

    def validate(self, config: LayerRequest) -> None:
        if config.projector_type == "lean":
            raise ValueError(
                f"projector_type='lean' with connector={self.name!r}: {self.name} splices the projected tokens into "
                f"the LLM input at its width; use 'mlp2x_gelu' or 'linear' for {self.name}"
            )

    def check_base(self, base_model: torch.nn.Module) -> None:
        """concat feeds the base input embeddings with the image tokens spliced in, in `forward` and `generate`."""
        name = type(base_model).__name__
        prepare = getattr(base_model, "prepare_inputs_for_generation", None)
        if prepare is not None and "inputs_embeds" not in inspect.signature(prepare).parameters:
            raise ValueError(
                f"connector={self.name!r} cannot drive {name}: its generate takes no inputs_embeds, and {self.name} "
                "splices the image tokens into the input embeddings; use connector='hive' or 'cascaded' on this model"
            )

    def resolve_layers(self, config: LayerRequest, *, num_vision_layers: int, num_llm_layers: int) -> ResolvedLayers:
        return ResolvedLayers((self.vision_levels(config, num_vision_layers)[-1],), (), ())

    def forward(self, model, language_model, *, input_ids, pixel_values, attention_mask, labels, inputs_embeds,
                past_key_values, vision_inputs, **kwargs):  # fmt: skip
        text = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        segments = packed_segments(
            kwargs.get("position_ids"), attention_mask=attention_mask, past_key_values=past_key_values
        )
        if segments is not None:
            check_packed_language_model(language_model, kwargs)
            embeddings, kwargs["position_ids"], labels, additions = self.packed_embeddings(
                model, input_ids, inputs_embeds, pixel_values, segments, kwargs["position_ids"], labels, vision_inputs
            )
            kwargs.update(flash_packing_kwargs(language_model, kwargs["position_ids"]))
            with added_after_layers(model, additions):
                return language_model(inputs_embeds=embeddings, labels=labels, **kwargs)
        additions = []
        if pixel_values is not None or (model.training and torch.is_grad_enabled()):
            # (A training step without images still runs every projector: ZeRO-3 must see each parameter.)
            if past_length_of(past_key_values) > 0:
                raise ValueError(
                    "connector='concat': pixel_values came with a decoding step (the cache already holds "
                    f"{past_length_of(past_key_values)} tokens); images are spliced into the prompt, pass them "
                    "with it"
                )
            embeddings, attention_mask, labels, additions = self.embeddings(
                model,
                input_ids,
                inputs_embeds,
                pixel_values,
                attention_mask,
                labels,
                vision_inputs,
                padding_side="right",
            )
            text = {"inputs_embeds": embeddings}
        # else text alone: a decoding step, or embeddings `generate` already spliced
        with added_after_layers(model, additions):
            return language_model(
                **text, attention_mask=attention_mask, labels=labels, past_key_values=past_key_values, **kwargs
            )

    def hidden_states(self, model, decoder, *, input_ids, pixel_values, attention_mask, inputs_embeds,
                      past_key_values, vision_inputs, **kwargs):  # fmt: skip
        """The decoder's output on the spliced sequence, `last_hidden_state` gathered back to the input's columns:
        a marker's column takes its image's last token, whose hidden state predicts the text after the image.
        Only `last_hidden_state` is gathered (the cache and any `hidden_states` stay spliced)."""
        if pixel_values is None and not (model.training and torch.is_grad_enabled()):
            return super().hidden_states(
                model, decoder, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                inputs_embeds=inputs_embeds, past_key_values=past_key_values, vision_inputs=vision_inputs, **kwargs,
            )  # fmt: skip
        if past_length_of(past_key_values) > 0:
            raise ValueError("connector='concat': a backbone forward takes whole prompts, not decoding steps")
        embeddings, spliced_mask, _, *positions, additions = self.embeddings(
            model, input_ids, inputs_embeds, pixel_values, attention_mask, None, vision_inputs,
            padding_side="right", return_positions=True,
        )  # fmt: skip
        with added_after_layers(model, additions):
            output = decoder(
                inputs_embeds=embeddings, attention_mask=spliced_mask, past_key_values=past_key_values, **kwargs
            )
        if positions:  # images were spliced in (without images the columns are the input's)
            hidden = output.last_hidden_state
            index = positions[0].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            output.last_hidden_state = hidden.gather(1, index)
        return output

    def generate(self, model, generate, *, input_ids, pixel_values, attention_mask, inputs_embeds, vision_inputs,
                 **kwargs):  # fmt: skip
        embeddings, attention_mask, _, additions = self.embeddings(
            model, input_ids, inputs_embeds, pixel_values, attention_mask, None, vision_inputs, padding_side="left"
        )
        with added_after_layers(model, additions):
            output = generate(inputs_embeds=embeddings, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            return output  # from embeddings alone: the new tokens only, as transformers returns them
        # From token ids: the prompt in front of the new tokens, in the tensor and in `sequences` alike.
        new_tokens = output if isinstance(output, torch.Tensor) else output.sequences
        prompt = input_ids.repeat_interleave(new_tokens.shape[0] // input_ids.shape[0], 0)
        sequences = torch.cat([prompt, new_tokens], 1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    @staticmethod
    def images_to_splice(model, input_ids, inputs_embeds, pixel_values, vision_inputs):
        """(input embeddings, per resolved level, shallow to deep, each image's tokens to splice: (images, tokens,
        hidden), or a list of (tokens_i, hidden) for NaFlex grids). Without images the levels are None and every
        projector still runs (ZeRO-3 must see every parameter), adding exactly zero to the embeddings."""
        embeddings = inputs_embeds if inputs_embeds is not None else model.get_input_embeddings()(input_ids)
        vision = model.hive_vision
        if pixel_values is None:
            levels, _ = vision.encode(**vision.dummy_inputs(embeddings.device))
            return embeddings + 0.0 * sum(level.sum() for level in levels).to(embeddings.dtype), None
        pixel_values, _ = vision.usable(pixel_values, vision_inputs, training=model.training)  # left out: blank
        levels, token_mask = vision.encode(pixel_values, **vision_inputs)
        levels = [level.to(embeddings.dtype) for level in levels]
        if token_mask is not None:  # NaFlex: each image's real tokens only
            levels = [[image[real] for image, real in zip(level, token_mask, strict=True)] for level in levels]
        return embeddings, levels

    @staticmethod
    def packed_embeddings(model, input_ids, inputs_embeds, pixel_values, segments, position_ids, labels,
                          vision_inputs):  # fmt: skip
        """Input embeddings of packed rows with each image's tokens inside its own sample (`splice_packed`), the
        position ids and labels of the spliced rows, and the shallower levels' additions (spliced into zeros)."""
        embeddings, levels = ConcatConnector.images_to_splice(
            model, input_ids, inputs_embeds, pixel_values, vision_inputs
        )
        if levels is None:
            return embeddings, position_ids, labels, []
        markers = model.hive_markers(input_ids, inputs_embeds)
        spliced = splice_packed(
            markers=markers, segments=segments, embeddings=embeddings, images=levels[-1], labels=labels
        )
        zeros = torch.zeros_like(embeddings)
        additions = [
            splice_packed(markers=markers, segments=segments, embeddings=zeros, images=level, labels=None)[0]
            for level in levels[:-1]
        ]
        return *spliced, additions

    @staticmethod
    def embeddings(model, input_ids, inputs_embeds, pixel_values, attention_mask, labels, vision_inputs, *,
                   padding_side: str, return_positions: bool = False):  # fmt: skip
        """Input embeddings with each image's deepest-level tokens spliced in at its marker, mask, labels (and, with
        `return_positions`, where each input column landed: `splice_image_tokens`; not without images), then the
        shallower levels' additions: each spliced likewise into zeros (none for concat, none without images).

        Without images every projector still runs (ZeRO-3 must see every parameter) and adds exactly zero.
        """
        embeddings, levels = ConcatConnector.images_to_splice(
            model, input_ids, inputs_embeds, pixel_values, vision_inputs
        )
        if levels is None:
            return embeddings, attention_mask, labels, []
        markers = model.hive_markers(input_ids, inputs_embeds)
        spliced = splice_image_tokens(
            markers=markers,
            embeddings=embeddings,
            images=levels[-1],
            attention_mask=attention_mask,
            labels=labels,
            padding_side=padding_side,
            return_positions=return_positions,
        )
        zeros = torch.zeros_like(embeddings)
        additions = [
            splice_image_tokens(
                markers=markers, embeddings=zeros, images=level, attention_mask=attention_mask, labels=None,
                padding_side=padding_side,
            )[0]
            for level in levels[:-1]
        ]  # fmt: skip
        return *spliced, additions


class DeepStackConnector(ConcatConnector):
    """Qwen3-VL's DeepStack as a baseline: the deepest selected level spliced in as image tokens (as `concat`), and
    each shallower level k, projected by its own projector, added to the output of decoder layer k at those image
    tokens' positions (Qwen3-VL's `deepstack_visual_indexes` into its first decoder layers). `llm_layers` is not
    read: the levels go to the first decoder layers, in order, as in Qwen3-VL. One level is concat exactly."""

    name = "deepstack"

    def resolve_layers(self, config: LayerRequest, *, num_vision_layers: int, num_llm_layers: int) -> ResolvedLayers:
        levels = self.vision_levels(config, num_vision_layers)
        if len(levels) - 1 > num_llm_layers:
            raise ValueError(
                f"vision_layers={levels}: connector='deepstack' adds the {len(levels) - 1} levels before the deepest "
                f"to as many first decoder layers, the language model has {num_llm_layers}; select fewer levels"
            )
        return ResolvedLayers(tuple(levels), (), ())
