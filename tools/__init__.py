"""Research scripts on the synthetic task, run from the repository root
(`python -m tools.synthetic_probe ...`); they may import any layer, and nothing imports them."""
