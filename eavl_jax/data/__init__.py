"""The data layer: the refer reader, the TFDS builder, the synthetic task; the commands that call
it live in data_prep/."""
