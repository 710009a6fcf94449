"""Experiment configs: each file's `get_config()` is loaded by ml_collections' config flags."""
