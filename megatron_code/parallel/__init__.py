"""Process groups and the apply_* functions that parallelize a model from outside."""
