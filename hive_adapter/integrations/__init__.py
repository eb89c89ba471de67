"""Integrations of HIVE into training code people already run (the LLaVA repo)."""
