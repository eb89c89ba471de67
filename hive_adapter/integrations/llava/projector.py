"""Deprecated module of hive-adapter 0.1 (`HiveLlavaProjector`, now `modules.HiveLlavaModules`; the settings
now in `settings`, the markers in `markers`): LLaVA checkouts patched by 0.1 import it. Removed in 0.3."""

import warnings

from .markers import IMAGE_TOKEN_INDEX, TextWithoutMarkers, drop_image_markers  # noqa: F401
from .modules import HiveLlavaModules as HiveLlavaProjector  # noqa: F401
from .modules import hive_modules_of as hive_projector_of  # noqa: F401
from .settings import add_projector_settings, hive_llava_settings, settings_in_adapter_file  # noqa: F401

warnings.warn(
    "hive_adapter.integrations.llava.projector is split into modules, settings and markers; re-apply "
    "patches/llava/*.patch to your LLaVA checkout (this name goes in 0.3)",
    DeprecationWarning,
    stacklevel=2,
)
