"""Infrastructure the core may use: output directories that never lose a file, what CLIs print, ranks.

Imports nothing from the other packages of hive_adapter.
"""
