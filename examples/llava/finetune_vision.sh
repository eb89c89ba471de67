#!/bin/bash
# Stage 3 (HIVE modules + LLM + vision tower): continue from stage 2 with --unfreeze_vision_tower True,
# which upstream LLaVA cannot do. Learning rate from the paper's Table 3 (2e-6 peak).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-./checkpoints/llava-v1.5-7b-hive}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
DATA=${DATA:-./playground/data/llava_v1_5_mix665k.json}
IMAGES=${IMAGES:-./playground/data}
OUTPUT=${OUTPUT:-./checkpoints/llava-v1.5-7b-hive-vision}
LAUNCHER=${LAUNCHER:-deepspeed}
ENTRY=${ENTRY:-hive_adapter.integrations.llava.train_mem}  # flash-attention 2; ...llava.train: SDPA, CPU

$LAUNCHER --module "$ENTRY" \
    --deepspeed "$HERE/zero3.json" \
    --model_name_or_path "$MODEL" \
    --version v1 \
    --data_path "$DATA" \
    --image_folder "$IMAGES" \
    --vision_tower "$VISION_TOWER" \
    --vision_connector hive \
    --unfreeze_vision_tower True \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUTPUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-6 \
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
