"""The published configs of the VLM families HIVE wraps, typed in (no hub access), and one typical image each.

Where every value comes from: each family's `source` names the stored public material its values were checked
against (repository and path, or page address; searched without hub access) and says which values no such source
showed. Values no source showed were typed in from memory. What checks all of them: the parameter count of the
model built from them on `meta`, against the model card's figure (`published_parameters`), in
tests/test_families_real_size.py. Values that change neither the parameter count nor the FLOPs (token ids, rope
theta, LLaVA-NeXT's grid pinpoints) are checked by no count.

Image positions (the family's own connector) and HIVE keys (HIVE's default: every encoder patch of every crop of the
image, prefix tokens dropped) for the typical image named in `image`, derived from the family's processor rules:
- Qwen2/2.5-VL: 448x448 -> 32x32 patches of 14 (1024 keys), 2x2 merge -> 256 positions;
- Qwen3-VL: 512x512 -> 32x32 patches of 16 (1024 keys) -> 256 positions;
- Gemma 3: 896x896 -> 64x64 patches (4096 keys), pooled to 256 positions;
- PaliGemma 224: 16x16 patches (256 keys) = 256 positions;
- LLaVA-NeXT: 672x672 -> 2x2 crops of 336 + the base image: 5 x 576 keys; 576 + 48x48 + 48 newlines = 2928;
- LLaVA-OneVision: 768x768 -> 2x2 crops of 384 + base: 5 x 729 keys; 729 + 54x54 + 54 newlines = 3699;
- SmolVLM2 / Idefics3: the image processor resizes any image to a longest edge of 4 x 384 = 1536 / 4 x 364 = 1456
  (its default, from memory) -> 4x4 crops + the global view: 17 x 729 / 17 x 676 keys; pixel shuffle (scale 3 / 2)
  -> 17 x 81 = 1377 / 17 x 169 = 2873 positions (row/column text tokens not counted);
- InternVL3: 896x896 -> 2x2 tiles of 448 + thumbnail: 5 x 1024 keys; pixel shuffle 0.5 -> 5 x 256 = 1280;
- Mistral 3.1 (Pixtral): 1008x1008 -> 72x72 patches of 14 (5184 keys); 2x2 merge -> 36x36 + 36 [IMG_BREAK]/[IMG_END]
  = 1332 positions;
- Gemma 4 (E2B): the image processor keeps the aspect ratio within a budget of 280 soft tokens x 3x3 patches of 16
  (transformers' Gemma4ImageProcessor defaults: max_soft_tokens 280, pooling_kernel_size 3, sides multiples of 48):
  a square image -> 768x768 -> 48x48 patches (2304 keys), pooled 3x3 -> 256 positions (boi/eoi not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRT_QWEN25 = "NVIDIA/TensorRT-LLM tests/unittest/_torch/modeling/test_modeling_qwen2_5vl.py (QWEN2_5_VL_7B_CONFIG)"
FROM_MEMORY = "typed in from memory"


@dataclass(frozen=True)
class FamilySize:
    name: str
    checkpoint: str
    config_class: str
    model_class: str
    config: dict[str, Any]
    published_parameters: str  # the model card's figure
    num_vision_layers: int
    image: str  # the typical image
    image_pixels: int  # its side (square), where the projector needs it
    image_positions: int  # sequence positions the family's connector gives it
    hive_keys: int  # encoder patches HIVE reads for it (all crops)
    projector_kind: str  # how to call the family's projector (benchmarks.family_sizes.family_connector_flops)
    projector_input: tuple[int, ...]
    source: str = FROM_MEMORY  # where the values were checked (see the module docstring)
    extra: dict[str, Any] = field(default_factory=dict)


QWEN2_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6)  # fmt: skip
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     patch_size=14)  # fmt: skip
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, model_type="clip_vision_model")  # fmt: skip

FAMILIES: tuple[FamilySize, ...] = (
    FamilySize(
        "Qwen2.5-VL-7B", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
        dict(text_config=dict(QWEN2_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                            "rope_theta": 1e6}),
             vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                                fullatt_block_indexes=[7, 15, 23, 31])),
        "8.29B", 32, "448x448", 448, 256, 1024, "qwen_merger", (1024, 1280),
        source=f"{TRT_QWEN25}: every width, vocab, rope theta and mrope section (its layer counts are cut for the test;"
        " its comments give 28 decoder layers and 32 ViT blocks); fullatt_block_indexes [7, 15, 23, 31]: transformers"
        " 5.23's Qwen2_5_VLVisionConfig defaults and a stored public copy of Qwen2.5-VL-7B-Instruct's vision_config"
        " (repository not named by the search index)",
    ),
    FamilySize(
        "Qwen2-VL-7B", "Qwen/Qwen2-VL-7B-Instruct", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
        dict(text_config=dict(QWEN2_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                            "rope_theta": 1e6}),
             vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14,
                                spatial_merge_size=2, temporal_patch_size=2)),
        "8.29B", 32, "448x448", 448, 256, 1024, "qwen_merger", (1024, 1280),
        source="vision (depth 32, embed_dim 1280, hidden_size 3584, mlp_ratio 4, 16 heads, patch 14, merge 2):"
        " huggingface/transformers src/transformers/models/qwen2_vl/configuration_qwen2_vl.py, Qwen2VLVisionConfig's"
        f" defaults, documented against Qwen/Qwen2-VL-7B-Instruct; text: Qwen2-7B's widths, as in {TRT_QWEN25};"
        " vocab 152064 and mrope [16, 24, 24] also in a stored public Qwen2-VL config fixture (repository not named)",
    ),
    FamilySize(
        "Qwen3-VL-8B", "Qwen/Qwen3-VL-8B-Instruct", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration",
        dict(text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                              rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                               "mrope_interleaved": True, "rope_theta": 5e6}),
             vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                                patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
             tie_word_embeddings=False),
        "8.77B", 27, "512x512", 512, 256, 1024, "qwen_merger", (1024, 1152),
        source="NVIDIA/TensorRT-LLM tests/unittest/_torch/modeling/test_modeling_qwen3vl.py (QWEN3_VL_8B_CONFIG, named"
        " Qwen3-VL-8B-Instruct; its comment gives the full model's 36 layers): every value",
    ),
    FamilySize(
        "Gemma-3-4B", "google/gemma-3-4b-it", "Gemma3Config", "Gemma3ForConditionalGeneration",
        dict(text_config=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                              query_pre_attn_scalar=256),
             vision_config=dict(SIGLIP_SO400M, image_size=896, vision_use_head=False), mm_tokens_per_image=256),
        "4.30B", 27, "896x896", 896, 256, 4096, "tokens", (1, 4096, 1152),
        source="page https://fast.hugflare.com/simaai/gemma-3-4b-it-a16w4/raw/main/devkit/vlm_config.json (a deployment"
        " config of google/gemma-3-4b-it): every value (SigLIP 896/14, 1152 wide, MLP 4304, 16 heads, 27 layers; 256"
        " tokens per image; text 2560 wide, 34 layers, MLP 10240, 8/4 heads of 256, vocab 262208, window 1024,"
        " query_pre_attn_scalar 256)",
    ),
    FamilySize(
        "PaliGemma-3B", "google/paligemma-3b-pt-224", "PaliGemmaConfig", "PaliGemmaForConditionalGeneration",
        dict(text_config=dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                              num_key_value_heads=1, head_dim=256, vocab_size=257216, model_type="gemma"),
             vision_config=dict(SIGLIP_SO400M, image_size=224, projection_dim=2048, vision_use_head=False),
             projection_dim=2048),
        "2.92B", 27, "224x224", 224, 256, 256, "tokens", (1, 256, 1152),
        source="huggingface/transformers src/transformers/models/colpali/convert_colpali_weights_to_hf.py"
        " (ORIGINAL_CONFIG, copied from vidore/colpali-v1.2-merged's config.json, a PaliGemma-3B fine-tune): text"
        " (2048 wide, MLP 16384, 18 layers, 8 heads, 1 KV head, vocab 257216) and SigLIP (1152, MLP 4304, 16 heads,"
        " 27 layers, patch 14, projection 2048, no head); image_size 224: the checkpoint's name (pt-224)",
    ),
    FamilySize(
        "LLaVA-NeXT-Mistral-7B", "llava-hf/llava-v1.6-mistral-7b-hf", "LlavaNextConfig",
        "LlavaNextForConditionalGeneration",
        dict(text_config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=32064, model_type="mistral", rope_theta=1e6),
             vision_config=CLIP_L_336,
             image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
        "7.57B", 24, "672x672 (2x2 crops + base)", 672, 2928, 5 * 576, "tokens", (5, 576, 1024),
        source="a stored public fine-tuning script whose flags repeat llava-hf/llava-v1.6-mistral-7b-hf's config.json"
        " (it links it; repository not named by the search index): vocab 32064, text 4096 wide, MLP 14336, 32 layers,"
        " 32/8 heads, rope theta 1e6; CLIP 1024 wide, MLP 4096, 16 heads, 24 layers, 336/14, projection 768;"
        " image_grid_pinpoints typed in from memory",
    ),
    FamilySize(
        "LLaVA-OneVision-7B", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "LlavaOnevisionConfig",
        "LlavaOnevisionForConditionalGeneration",
        dict(text_config=dict(QWEN2_TEXT, vocab_size=152128, model_type="qwen2", rope_theta=1e6),
             vision_config=dict(SIGLIP_SO400M, num_hidden_layers=26, image_size=384, vision_use_head=False,
                                model_type="siglip_vision_model"),
             vision_feature_layer=-1),
        "8.03B", 26, "768x768 (2x2 crops + base)", 768, 3699, 5 * 729, "tokens", (5, 729, 1152),
        source="huggingface/transformers src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf"
        ".py: SigLIP (1152, 384/14, MLP 4304, 16 heads, 26 layers: the last dropped, no head), the text model"
        " Qwen/Qwen2-7B-Instruct (Qwen2-7B's widths, as Qwen2.5-VL-7B's) and its vocabulary grown by 2, padded to a"
        " multiple of 64: 152064 -> 152128",
    ),
    FamilySize(
        "SmolVLM2-2.2B", "HuggingFaceTB/SmolVLM2-2.2B-Instruct", "SmolVLMConfig", "SmolVLMForConditionalGeneration",
        dict(text_config=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=49280, rope_theta=130000.0, model_type="llama"),
             vision_config=dict(SIGLIP_SO400M, image_size=384), scale_factor=3, image_token_id=49190),
        "2.25B", 27, "any (4x4 crops + global)", 1536, 17 * 81, 17 * 729, "connector", (17, 729, 1152),
        source="vocab 49280, image token 49190: a stored public SmolVLM2-500M config ('verbatim from the model card';"
        " the family shares them); text (2048 wide, MLP 8192, 24 layers, 32/32 heads, rope theta 130000): stored"
        " public copies of HuggingFaceTB/SmolLM2-1.7B-Instruct's config.json, its language model (repositories not"
        " named by the search index); scale_factor 3, image_size 384, SigLIP widths typed in from memory (the card's"
        " 2.25B tells scale 3 from 4: 2.27B)",
    ),
    FamilySize(
        "Idefics3-8B", "HuggingFaceM4/Idefics3-8B-Llama3", "Idefics3Config", "Idefics3ForConditionalGeneration",
        dict(text_config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128259, rope_theta=500000.0, model_type="llama"),
             vision_config=dict(SIGLIP_SO400M, image_size=364), scale_factor=2),
        "8.46B", 27, "any (4x4 crops + global)", 1456, 17 * 169, 17 * 676, "connector", (17, 676, 1152),
        source="a stored public test fixture of Idefics3-8B's config (repository not named by the search index): text"
        " 4096 wide, MLP 14336, 32 layers, 32/8 heads, vocab 128259; SigLIP 1152, 364/14, 27 layers, 16 heads;"
        " scale_factor 2; rope theta typed in from memory",
    ),
    FamilySize(
        "InternVL3-8B", "OpenGVLab/InternVL3-8B-hf", "InternVLConfig", "InternVLForConditionalGeneration",
        dict(text_config=dict(QWEN2_TEXT, vocab_size=151674, model_type="qwen2", rope_theta=1e6),
             vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=[448, 448], patch_size=[14, 14]),
             downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False),
        "7.94B", 24, "896x896 (2x2 tiles + thumbnail)", 896, 1280, 5 * 1024, "internvl", (5, 256, 4096),
        source="vocab 151674, downsample_ratio 0.5, rope theta 1e6: InternVL3-8B-hf's config as printed in"
        " https://github.com/vllm-project/vllm/issues/17634 (a stored excerpt); InternViT-300M (1024 wide, MLP 4096,"
        " 24 layers, 16 heads, 448/14): stored public InternVL2.5/3 configs (repositories not named by the search"
        " index); text: Qwen2.5-7B's widths (huggingface/transformers src/transformers/models/internvl/"
        f"convert_internvl_weights_to_hf.py lists OpenGVLab/InternVL3-8B as qwen2), as in {TRT_QWEN25}",
    ),
    FamilySize(
        "Mistral-Small-3.1-24B", "mistralai/Mistral-Small-3.1-24B-Instruct-2503", "Mistral3Config",
        "Mistral3ForConditionalGeneration",
        dict(text_config=dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=128, vocab_size=131072, rope_theta=1e9,
                              model_type="mistral"),
             vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                head_dim=64, image_size=1540, patch_size=14, rope_theta=10000.0, model_type="pixtral"),
             spatial_merge_size=2, multimodal_projector_bias=False, vision_feature_layer=-1,
             tie_word_embeddings=False),
        "24.0B", 24, "1008x1008", 1008, 1332, 72 * 72, "pixtral", (5184, 1024),
        source="huggingface/transformers src/transformers/models/mistral3/configuration_mistral3.py (5.23):"
        " Mistral3Config's defaults, documented against mistralai/Mistral-Small-3.1-24B-Instruct-2503, are every"
        " value but tie_word_embeddings (True there; the card's 24.0B needs untied: tied gives 23.3B)",
    ),
    FamilySize(
        "Gemma-4-E2B", "google/gemma-4-E2B-it", "Gemma4Config", "Gemma4ForConditionalGeneration",
        dict(text_config=dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
                              num_key_value_heads=1, head_dim=256, global_head_dim=512, num_global_key_value_heads=None,
                              attention_k_eq_v=False, sliding_window=512, vocab_size=262144,
                              vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256,
                              num_kv_shared_layers=20, use_double_wide_mlp=True, final_logit_softcapping=30.0,
                              layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7),
             vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                                num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
                                position_embedding_size=10240, use_clipped_linears=True, standardize=False),
             audio_config={}),
        "5.1B", 16, "any (square -> 768x768, 280-token budget)", 768, 256, 48 * 48, "embed_vision", (1, 256, 768),
        source="a stored public test of a loader parsing google/gemma-4-E2B-it's config (test_parse_gemma4_e2b_config;"
        " repository not named by the search index): every text and vision value typed in here, its audio block"
        " equal to transformers 5.23's Gemma4AudioConfig defaults; the same vision and audio figures are transformers"
        " 5.23's Gemma4VisionConfig/Gemma4AudioConfig defaults (documented against google/gemma-4-e2b-it), and pages"
        " https://apxml.com/models/gemma-4-e2b (35 layers, 8/1 heads of 256, window 512, vocab 262144; card figure"
        " 5.1B with per-layer embeddings, 2.3B effective) and https://hff.sound2gd.work/OsaurusAI/gemma-4-E2B-it-qat-"
        "MXFP4 (hidden 1536, 7 full + 28 sliding layers; vision 16 layers, 768 wide, patch 16; 280 image tokens)",
    ),
)  # fmt: skip

# Families whose real size is not measured, and why (rendered under the table).
NOT_MEASURED: dict[str, str] = {}
