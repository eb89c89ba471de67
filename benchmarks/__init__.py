"""HIVE vs self-attention (concat) vs cascaded: FLOPs at paper scale, activation memory, step time,
generation and scaling, side by side. `python -m benchmarks.run --suite cpu|gpu|all`."""
