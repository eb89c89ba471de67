"""lmms-eval discovers the `hive` model here (entry-point group `lmms_eval.models`, see setup.py).

Kept apart from `lmms_model.py` so that discovery imports nothing heavy: lmms-eval calls `manifest()`
for every installed plugin at start-up, and loads the model class only when `--model hive` is used.
"""

from __future__ import annotations


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="hive", simple_class_path="hive_adapter.evaluation.lmms_model.HiveLmms")
