"""Deprecated name of `handlers` (hive-adapter 0.1): LLaVA checkouts patched by 0.1 import it. Removed in 0.3."""

import warnings

from .handlers import *  # noqa: F403

warnings.warn(
    "hive_adapter.integrations.llava.hooks is now hive_adapter.integrations.llava.handlers; re-apply "
    "patches/llava/*.patch to your LLaVA checkout (this name goes in 0.3)",
    DeprecationWarning,
    stacklevel=2,
)
