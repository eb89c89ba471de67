#!/bin/bash
# Stage 1 (HIVE modules only): LLaVA's scripts/v1_5/pretrain.sh, entry point changed, --vision_connector hive added.
# Paths and the launcher come from the environment; extra flags are appended (last one wins).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
DATA=${DATA:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGES=${IMAGES:-./playground/data/LLaVA-Pretrain/images}
OUTPUT=${OUTPUT:-./checkpoints/llava-v1.5-7b-hive-pretrain}
LAUNCHER=${LAUNCHER:-deepspeed}
ENTRY=${ENTRY:-hive_adapter.integrations.llava.train_mem}  # flash-attention 2; ...llava.train: SDPA, CPU

$LAUNCHER --module "$ENTRY" \
    --deepspeed "$HERE/zero2.json" \
    --model_name_or_path "$MODEL" \
    --version plain \
    --data_path "$DATA" \
    --image_folder "$IMAGES" \
    --vision_tower "$VISION_TOWER" \
    --vision_connector hive \
    --mm_projector_type mlp2x_gelu \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir "$OUTPUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 32 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 24000 \
    --save_total_limit 1 \
    --learning_rate 1e-3 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb \
    "$@"
