"""`HiveForConditionalGeneration` for vLLM: vLLM's own decoder layers with HIVE's gated cross-attention between.

The forward matches `hive_adapter.model.modeling_hive.HiveForConditionalGeneration` (transformers):

    h <- h + tanh(g) * where(sees_image, o(XAttn(LN(h), K/V of LN(level))), 0)      at each HIVE decoder layer

- vision side: the HF vision tower, `HiveLevelEncoder` and their weights are HIVE's own modules (`embed_multimodal`,
  once per request); each image's levels side by side, (tokens, levels * media width);
- language model: vLLM's `*ForCausalLM` for the checkpoint's `text_config` (Llama, Qwen2, Mistral, ...): its
  embedding, decoder layers, final norm and LM head. HIVE's blocks run before (or after) the layers they name;
- cross-attention: one `CrossAttention` (`AttentionType.ENCODER_DECODER`) per block, with its own paged K/V cache
  per request, written from the block's own level on the prompt's step;
- which tokens see the image (`sees_image`): in captioning mode every token of a request with an image; in marker
  mode the tokens at or after the image's marker, and every generated token. vLLM runs an encoder-decoder prompt
  whole, from position 0 (it turns chunked prefill and prefix caching off), so the marker is in the prompt's step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers import AutoModel
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention.cross_attention import CrossAttention
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.registry import ModelRegistry
from vllm.multimodal import MULTIMODAL_REGISTRY

from hive_adapter.model.architectures import text_shape_of, vision_shape_of
from hive_adapter.model.builders import build_level_encoder, kv_shape, media_width
from hive_adapter.model.cross_attention import HiveLayerNorm
from hive_adapter.model.vision import HiveVisionSide

from .config import refuse_unservable
from .processing import HiveDummyInputsBuilder, HiveMultiModalProcessor, HiveProcessingInfo

logger = logging.getLogger(__name__)


class HiveServingAttention(nn.Module):
    """HIVE's projections (the checkpoint's `attn.hive_*_proj`) around vLLM's paged cross-attention."""

    def __init__(
        self, *, hidden_size: int, media_size: int, heads: int, kv_heads: int, head_dim: int, prefix: str, cache_config
    ):
        super().__init__()
        self.hive_q_proj = nn.Linear(hidden_size, heads * head_dim, bias=False)
        self.hive_k_proj = nn.Linear(media_size, kv_heads * head_dim, bias=False)
        self.hive_v_proj = nn.Linear(media_size, kv_heads * head_dim, bias=False)
        self.hive_o_proj = nn.Linear(heads * head_dim, hidden_size, bias=False)
        self.cross = CrossAttention(
            heads, head_dim, head_dim**-0.5, num_kv_heads=kv_heads, cache_config=cache_config, prefix=f"{prefix}.cross"
        )

    def forward(self, hidden: torch.Tensor, media: torch.Tensor | None) -> torch.Tensor:
        """hidden (tokens, hidden), media (encoder tokens, media width) on the prompt's step, else None."""
        query = self.hive_q_proj(hidden)
        key = value = None
        if media is not None:
            key, value = self.hive_k_proj(media), self.hive_v_proj(media)
        return self.hive_o_proj(self.cross(query, key, value))


class HiveServingBlock(nn.Module):
    """`HiveCrossAttentionBlock` with vLLM's cross-attention; the same parameter names, so the same checkpoint."""

    def __init__(
        self,
        *,
        hidden_size: int,
        media_size: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        norm_eps: float,
        use_ffn: bool,
        ffn_mult: int,
        prefix: str,
        cache_config,
    ):
        super().__init__()
        self.hive_attn_norm = HiveLayerNorm(hidden_size, eps=norm_eps)
        self.hive_media_norm = HiveLayerNorm(media_size, eps=norm_eps)
        self.attn = HiveServingAttention(
            hidden_size=hidden_size,
            media_size=media_size,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            prefix=f"{prefix}.attn",
            cache_config=cache_config,
        )
        self.hive_attn_gate = nn.Parameter(torch.zeros(1))
        self.hive_ffn = None
        if use_ffn:
            self.hive_ffn_norm = HiveLayerNorm(hidden_size, eps=norm_eps)
            self.hive_ffn = nn.Sequential(
                nn.Linear(hidden_size, ffn_mult * hidden_size, bias=False),
                nn.GELU(),
                nn.Linear(ffn_mult * hidden_size, hidden_size, bias=False),
            )
            self.hive_ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, media: torch.Tensor | None, sees_image: torch.Tensor) -> torch.Tensor:
        """hidden (tokens, hidden); sees_image (tokens,) bool. A token that sees no image gets exactly nothing
        (selected away, never multiplied: its attention output may be anything)."""
        media = None if media is None else self.hive_media_norm(media)
        attended = self.attn(self.hive_attn_norm(hidden), media)
        keep = sees_image[:, None]
        nothing = hidden.new_zeros(())
        gate = torch.tanh(self.hive_attn_gate.float()).to(hidden.dtype)
        hidden = hidden + torch.where(keep, gate * attended.to(hidden.dtype), nothing)
        if self.hive_ffn is not None:
            fed = self.hive_ffn(self.hive_ffn_norm(hidden))
            gate = torch.tanh(self.hive_ffn_gate.float()).to(hidden.dtype)
            hidden = hidden + torch.where(keep, gate * fed.to(hidden.dtype), nothing)
        return hidden


@MULTIMODAL_REGISTRY.register_processor(
    HiveMultiModalProcessor, info=HiveProcessingInfo, dummy_inputs=HiveDummyInputsBuilder
)
class HiveForConditionalGeneration(nn.Module, SupportsMultiModal):
    """A HIVE checkpoint (`model_type="hive"`) served by vLLM."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return None  # HIVE's chat template writes each image's marker itself
        raise ValueError(f"a HIVE model reads images and text, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        refuse_unservable(config)
        self.config = config
        text_config, vision_config = config.text_config, config.vision_config
        resolved = config.resolve_layers(
            num_vision_layers=vision_config.num_hidden_layers, num_llm_layers=text_config.num_hidden_layers
        )
        text = text_shape_of(text_config, text_config.num_hidden_layers)
        vision = vision_shape_of(vision_config)
        self.marker = config.image_token_id
        self.placement = config.placement
        self.vision_model = AutoModel.from_config(vision_config)
        self.hive_levels = build_level_encoder(config, resolved, vision, text)
        self.media_size = media_width(config, vision, text)
        heads, kv_heads, head_dim = kv_shape(config, text)
        self.hive_blocks = nn.ModuleDict(
            {
                str(layer): HiveServingBlock(
                    hidden_size=text.hidden_size,
                    media_size=self.media_size,
                    heads=heads,
                    kv_heads=kv_heads,
                    head_dim=head_dim,
                    norm_eps=text.norm_eps,
                    use_ffn=config.use_ffn,
                    ffn_mult=config.ffn_mult,
                    prefix=f"{prefix}hive_blocks.{layer}",
                    cache_config=vllm_config.cache_config,
                )
                for layer in resolved.llm_layers
            }
        )
        self.level_of_layer = dict(zip(resolved.llm_layers, resolved.level_of_block, strict=True))
        self.vision_side = HiveVisionSide(
            tower=self.vision_model, shape=vision, vision_layers=resolved.vision_layers, levels=self.hive_levels
        )
        text_vllm_config = vllm_config.with_hf_config(text_config)  # architectures from model_type if unsaid
        architectures = text_vllm_config.model_config.hf_config.architectures
        language_class, _ = ModelRegistry.resolve_model_cls(architectures, text_vllm_config.model_config)
        self.language_model = language_class(vllm_config=text_vllm_config, prefix=f"{prefix}language_model")
        decoder = self.language_model.model
        if not hasattr(decoder, "layers") or len(decoder.layers) != text_config.num_hidden_layers:
            raise ValueError(f"{language_class.__name__}: no decoder layer list to run HIVE's blocks between")
        self.first_cross_layer = self.hive_blocks[str(resolved.llm_layers[0])].attn.cross.layer_name
        logger.info(
            "HIVE on vLLM: %s with HIVE blocks at decoder layers %s", language_class.__name__, list(resolved.llm_layers)
        )

    # ------------------------------------------------------------------ images
    def embed_multimodal(self, **kwargs: object):
        """Each image's projected levels, side by side: a list of (tokens, levels * media width)."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        levels, token_mask = self.vision_side.encode(pixel_values)
        if token_mask is not None:
            raise ValueError("images pooled to different token counts: the vLLM plugin needs one count per image")
        return list(torch.cat(levels, dim=-1).unbind(0))  # each (tokens, levels*media)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None):
        return self.language_model.model.embed_input_ids(input_ids)

    def get_language_model(self) -> nn.Module:
        return self.language_model

    # ------------------------------------------------------------------ forward
    def _sees_image(self, input_ids: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """(tokens,) True where a token sees its request's image (module docstring)."""
        tokens = positions.shape[0]
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0]
        cross = metadata.get(self.first_cross_layer) if isinstance(metadata, dict) else None
        if cross is None:  # a profiling run: nothing to see
            return torch.zeros(tokens, dtype=torch.bool, device=positions.device)
        starts = cross.query_start_loc.to(positions.device).long()
        requests = starts.numel() - 1
        lengths = starts[1:] - starts[:-1]
        has_image = cross.seq_lens[:requests].to(positions.device) > 0  # encoder tokens of each request
        request = torch.repeat_interleave(torch.arange(requests, device=positions.device), lengths)
        real = request.numel()
        sees = torch.zeros(tokens, dtype=torch.bool, device=positions.device)
        seen = has_image[request]
        if self.marker is not None and input_ids is not None:
            # the request's step from position 0 holds its whole prompt: the image is seen from its marker on
            markers = (input_ids[:real] == self.marker).long()
            counted = torch.cumsum(markers, 0)  # markers so far in the whole batch
            first = starts[:-1].clamp(max=max(real - 1, 0))  # each request's first token
            before = counted - torch.repeat_interleave(counted[first] - markers[first], lengths)  # in the request
            from_start = positions[first] == 0
            seen = seen & ((before > 0) | ~from_start[request])
        sees[:real] = seen
        return sees

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: list[torch.Tensor] | None = None,
        **kwargs,
    ):
        decoder = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else decoder.embed_input_ids(input_ids)
        levels = None
        if encoder_outputs:
            levels = torch.cat(list(encoder_outputs), dim=0).split(self.media_size, dim=-1)  # each (enc, media)
        sees_image = self._sees_image(input_ids, positions)
        residual = None
        for index, layer in enumerate(decoder.layers):
            block = self.hive_blocks[str(index)] if str(index) in self.hive_blocks else None
            if block is not None and self.placement == "before":
                hidden, residual = self._run_block(block, index, hidden, residual, levels, sees_image)
            hidden, residual = layer(positions, hidden, residual)
            if block is not None and self.placement == "after":
                hidden, residual = self._run_block(block, index, hidden, residual, levels, sees_image)
        hidden, _ = decoder.norm(hidden, residual)
        return hidden

    def _run_block(self, block, index, hidden, residual, levels, sees_image):
        """vLLM's layers carry the residual stream apart (hidden + residual); HIVE adds to their sum."""
        if residual is not None:
            hidden = hidden + residual
        media = None
        if levels is not None:
            level = self.level_of_layer[index]
            media = levels[level if level is not None else -1]
        return block(hidden, media, sees_image), None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint `save_pretrained` wrote: the language model's keys go to vLLM's own loader (which fuses
        q/k/v and gate/up), the vision tower's and HIVE's are copied by name."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()
        language: list[tuple[str, torch.Tensor]] = []
        for name, tensor in weights:
            if name.startswith("language_model."):
                language.append((name.removeprefix("language_model."), tensor))
                continue
            if name not in own:
                if name.startswith("vision_model.") and not name.startswith("vision_model.vision_model."):
                    continue  # parts of a full CLIP/SigLIP checkpoint the tower does not hold
                raise ValueError(f"the checkpoint holds {name!r}, which this HIVE model has no place for")
            own[name].data.copy_(tensor.to(own[name].dtype))
            loaded.add(name)
        loaded |= {f"language_model.{name}" for name in self.language_model.load_weights(language)}
        return loaded
