"""The papers' recipes as YAML: pretraining arms here, instruction-tuning arms in sft/. They install
with the package as `megatron_code.recipes`, so `importlib.resources.files("megatron_code.recipes")`
finds them from a checkout or an installed wheel."""
