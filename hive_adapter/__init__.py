"""hive-adapter: HIVE (Hierarchical Pre-Training of Vision Encoders with LLMs) for Hugging Face models.

    import hive_adapter as hive
    model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[1, 3, 5, 7], llm_layers=[0, 2, 4, 6]))

Importing the package registers `model_type="hive"` with transformers' Auto classes.
"""

from .adapter_model import HiveModel, get_hive_model
from .config import HiveConfig
from .console import drop_deepspeed_cpu_notice
from .context import HiveVisionContext
from .cross_attention import HiveCrossAttention, HiveCrossAttentionBlock
from .layout import image_token_id_from_tokenizer
from .levels import HiveLevelEncoder, HiveProjector
from .modeling_hive import HiveForConditionalGeneration, HivePreTrainedModel, _register_auto_classes
from .parameters import is_hive_parameter, mark_hive_trainable
from .processing_hive import HiveProcessor, _register_auto_processor
from .runtime import HiveRuntime
from .version import __version__

_register_auto_classes()
_register_auto_processor()
drop_deepspeed_cpu_notice()

__all__ = [
    "__version__",
    "HiveConfig",
    "HiveCrossAttention",
    "HiveCrossAttentionBlock",
    "HiveForConditionalGeneration",
    "HiveLevelEncoder",
    "HiveModel",
    "HivePreTrainedModel",
    "HiveProcessor",
    "HiveProjector",
    "HiveRuntime",
    "HiveVisionContext",
    "get_hive_model",
    "image_token_id_from_tokenizer",
    "is_hive_parameter",
    "mark_hive_trainable",
]
