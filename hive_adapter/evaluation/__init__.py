"""Evaluation with lmms-eval: the `hive` model, local (offline) task definitions, and their backends.

Nothing here imports lmms-eval at package import time: lmms-eval resets loguru's handlers when its
model registry is imported, so it is loaded only by lmms-eval itself (through the entry point in
`plugin.py`) or by the task utilities it calls.
"""
