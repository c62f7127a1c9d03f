"""The papers' recipes as YAML: pretraining arms here (Aryabumi et al.'s 2.8B arms in cohere_2.8b/),
instruction-tuning arms in sft/, and our own variants, which are no paper's arm, in extensions/ and
sft/extensions/. They install with the package as `megatron_code.recipes`, so
`importlib.resources.files("megatron_code.recipes")` finds them from a checkout or an installed wheel."""
