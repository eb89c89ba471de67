"""hive-adapter: HIVE (Hierarchical Pre-Training of Vision Encoders with LLMs) for Hugging Face models.

    import hive_adapter as hive
    model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[1, 3, 5, 7], llm_layers=[0, 2, 4, 6]))

Importing the package registers `model_type="hive"` with transformers' Auto classes. The modules live in role
packages (`model/`, the core; `utils/`; `training/`; `tools/`: docs/ARCHITECTURE.md §2); their flat paths of 0.3
(`hive_adapter.config`, `hive_adapter.train`, ...) still import, with a DeprecationWarning, until 0.4 (`_moved.py`).
"""

from . import _moved
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

_moved.install()
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


def __getattr__(name: str):
    """`hive_adapter.<module>` for a module's 0.3 path (`hive_adapter.config`), until 0.4."""
    return _moved.moved_attribute(name)
