"""Analysis and evaluation: what the paper's §9 figures and Table 4 probe show, on your checkpoints.

- `gradient_flow`: the LM-loss gradient at every vision-encoder layer (maps and norms);
- `cross_attention_maps`: where text tokens look in the image, per HIVE layer;
- `linear_probe`: a linear classifier on a frozen encoder (Table 4's recipe);
- `caption_accuracy`: teacher-forced caption-token accuracy, aligned across connectors.

Command lines: `hive-analyze`, `hive-probe`, `hive-reproduce`. Plots need matplotlib, the digits set
scikit-learn (`pip install "hive-adapter[analysis]"`).
"""

from .attention import AttentionMaps, cross_attention_maps
from .captioning import aligned_logits, caption_accuracy, caption_batch
from .gradients import GradientFlow, gradient_flow
from .probe import ProbeConfig, ProbeResult, linear_probe, load_frozen_encoder
from .probe_data import LabelledImages, built_in, image_folder

__all__ = [
    "AttentionMaps",
    "GradientFlow",
    "LabelledImages",
    "ProbeConfig",
    "ProbeResult",
    "aligned_logits",
    "built_in",
    "caption_accuracy",
    "caption_batch",
    "cross_attention_maps",
    "gradient_flow",
    "image_folder",
    "linear_probe",
    "load_frozen_encoder",
]
