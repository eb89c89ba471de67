"""hive-adapter: HIVE (Hierarchical Pre-Training of Vision Encoders with LLMs) for Hugging Face models.

    import hive_adapter as hive
    model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[1, 3, 5, 7], llm_layers=[0, 2, 4, 6]))

Importing the package registers `model_type="hive"` with transformers' Auto classes.
"""

from .model.adapter_model import HiveModel, get_hive_model
from .model.config import HiveConfig
from .model.context import HiveVisionContext
from .model.cross_attention import HiveCrossAttention, HiveCrossAttentionBlock
from .model.layout import image_token_id_from_tokenizer
from .model.levels import HiveLevelEncoder, HiveProjector
from .model.modeling_hive import HiveForConditionalGeneration, HivePreTrainedModel, _register_auto_classes
from .model.parameters import is_hive_parameter, mark_hive_trainable
from .model.processing_hive import HiveProcessor, _register_auto_processor
from .model.runtime import HiveRuntime
from .utils.console import drop_deepspeed_cpu_notice
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
