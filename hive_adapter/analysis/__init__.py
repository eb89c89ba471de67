"""Analysis and evaluation: what the paper's §9 figures and Table 4 probe show, on your checkpoints.

- `gradient_flow`: the LM-loss gradient at every vision-encoder layer (maps and norms);
- `cross_attention_maps`: where text tokens look in the image, per HIVE layer; `attention_entropy`: how
  selective each layer's attention is;
- `linear_probe`: a linear classifier on a frozen encoder (Table 4's recipe);
- `image_reading`: caption-token accuracy on content and structural tokens, with each sample's own
  image and with another sample's (the control that says whether the model reads the picture).

Command lines: `hive-analyze`, `hive-probe`, `hive-reproduce`. Plots need matplotlib, the digits set
scikit-learn (`pip install "hive-adapter[analysis]"`).
"""

from .attention import AttentionMaps, attention_entropy, cross_attention_maps
from .captioning import aligned_logits, caption_accuracy, caption_batch
from .gradients import GradientFlow, gradient_flow
from .image_reading import ImageReading, checkpoint_image_reading, image_reading, token_groups
from .probe import ProbeConfig, ProbeResult, linear_probe
from .probe_data import LabelledImages, built_in, image_folder
from .probe_features import load_frozen_encoder

__all__ = [
    "AttentionMaps",
    "GradientFlow",
    "ImageReading",
    "LabelledImages",
    "ProbeConfig",
    "ProbeResult",
    "aligned_logits",
    "attention_entropy",
    "built_in",
    "caption_accuracy",
    "caption_batch",
    "checkpoint_image_reading",
    "cross_attention_maps",
    "gradient_flow",
    "image_folder",
    "image_reading",
    "linear_probe",
    "load_frozen_encoder",
    "token_groups",
]
