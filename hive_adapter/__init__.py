"""hive-adapter: HIVE (Hierarchical Pre-Training of Vision Encoders with LLMs) for Hugging Face models.

    import hive_adapter as hive
    model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[1, 3, 5, 7], llm_layers=[0, 2, 4, 6]))

Importing the package registers `model_type="hive"` with transformers' Auto classes.
"""

from .config import HiveConfig
from .connector import image_token_id_from_tokenizer, mark_hive_trainable
from .context import HiveRuntime, HiveVisionContext
from .cross_attention import HiveCrossAttention, HiveCrossAttentionBlock
from .levels import HiveLevelEncoder, HiveProjector
from .model import HiveModel, get_hive_model
from .modeling_hive import HiveForConditionalGeneration, HivePreTrainedModel, _register_auto_classes
from .version import __version__

_register_auto_classes()

__all__ = [
    "__version__",
    "HiveConfig",
    "HiveCrossAttention",
    "HiveCrossAttentionBlock",
    "HiveForConditionalGeneration",
    "HiveLevelEncoder",
    "HiveModel",
    "HivePreTrainedModel",
    "HiveProjector",
    "HiveRuntime",
    "HiveVisionContext",
    "get_hive_model",
    "image_token_id_from_tokenizer",
    "mark_hive_trainable",
]
