"""The core: HIVE's modules, the two Hugging Face front ends built from them, and their checkpoints.

Imports nothing outside `hive_adapter.model` and `hive_adapter.utils` (tests/test_layout.py checks it).
What each module owns: docs/ARCHITECTURE.md §2.
"""
