"""The data commands (python -m data_prep.build, python -m data_prep.synthetic); run from a
clone, not installed. The code they call is eavl_jax/data/."""
