"""HIVE for the LLaVA repo (haotian-liu/LLaVA, `pip install llava-torch`): `--vision_connector hive`.

Two routes, one behaviour:

* `python -m hive_adapter.integrations.llava.train <LLaVA's usual flags> --vision_connector hive`
  (or `deepspeed .../train_mem.py ...`): patches the installed `llava` package and runs LLaVA's own
  `train()`. In your own script: `from hive_adapter.integrations.llava import apply_patch; apply_patch()`
  before `llava.train.train.train()` or `llava.model.builder.load_pretrained_model()`.
* a LLaVA checkout: `git apply patches/llava/*.patch` and keep using `llava/train/train_mem.py`.

HIVE's modules live under `model.mm_projector` (see `modules`), so LLaVA's stage-1 adapter
training/saving/loading, `--mm_projector_lr` and LoRA treat them as LLaVA's own connector.
"""

from .handlers import LlavaHiveArguments, LlavaHiveTrainingArguments
from .markers import drop_image_markers
from .modules import HiveLlavaModules, hive_modules_of
from .patch import apply_patch

__all__ = [
    "HiveLlavaModules",
    "LlavaHiveArguments",
    "LlavaHiveTrainingArguments",
    "apply_patch",
    "drop_image_markers",
    "hive_modules_of",
]
