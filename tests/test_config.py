"""The config tree: YAML + dotted overrides, presets, and field-named errors."""
import pytest

from megatron_code.config import PRESETS, ConfigError, config_from_dict, load_config

BASE = ["--data.sources=[{name: text, prefix: /x/text}]", "--data.tokenizer=/x/spm.model"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\n  hidden_size: 96\ntrain:\n  steps: 5\n"
                    "data:\n  tokenizer: t.model\n  sources:\n    - {name: code, prefix: /p/code, weight: 0.25}\n")
    config = load_config(path, ["--train.steps=7", "--optim.warmup_steps=1", "--optim.lr=1e-3",
                                "--model.tie_embeddings=false"])
    assert config.train.steps == 7 and config.optim.lr == 1e-3
    assert config.model.hidden_size == 96  # explicit field beats the preset
    assert config.model.num_layers == PRESETS["tiny"]["num_layers"]
    assert config.model.tie_embeddings is False
    assert config.data.sources[0].weight == 0.25 and config.data.sources[0].name == "code"
    assert config.data.sources[0].files() == [("/p/code", 1.0)]


def test_a_source_of_several_files(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  tokenizer: t.model\n  sources:\n    - {name: text, prefix: /p/text}\n"
                    "    - name: code\n      prefix:\n        - {prefix: /p/python_text_document, weight: 3}\n"
                    "        - {prefix: /p/c_text_document}\n")
    config = load_config(path)
    assert config.data.sources[1].files() == [("/p/python_text_document", 3.0), ("/p/c_text_document", 1.0)]
    assert config_from_dict(config.to_dict()).data.sources == config.data.sources  # as a checkpoint keeps it


SEVERAL = "--data.sources=[{name: text, prefix: /x/text}, {name: code, prefix: %s}]"


@pytest.mark.parametrize("override, message", [
    ("--train.stepz=3", "unknown field config.train.stepz"),
    ("--modle.hidden_size=3", "unknown field config.modle"),
    ("--train.steps=abc", "config.train.steps must be an integer, got 'abc'"),
    ("--train.steps=2.5", "config.train.steps must be an integer"),
    ("--model.norm=batchnorm", "model.norm='batchnorm' is not one of rmsnorm, layernorm"),
    ("--model.preset=huge", "config.model.preset='huge' is not one of"),
    ("--model.num_kv_heads=3", "model.num_heads=8 is not divisible by model.num_kv_heads=3"),
    ("--model.tokenizer_vocab_size=-1", "model.tokenizer_vocab_size=-1 must be >= 0"),
    ("--train.global_batch_size=12", "train.global_batch_size=12 is not a multiple of train.micro_batch_size=8"),
    ("--optim.schedule=step", "optim.schedule='step' is not one of"),
    ("--train.tensorboard=maybe", "config.train.tensorboard must be true or false"),
    (SEVERAL % "[{prefix: /x/py, weight: 3}, {prefix: /x/c, weight: -1}]",
     "data.sources[1].prefix[1].weight must be >= 0, got -1.0"),
    (SEVERAL % "[{prefix: /x/py, weight: 0}, {prefix: /x/c, weight: 0}]",
     "data.sources[1].prefix: the files' weights are all zero"),
    (SEVERAL % "[]", "data.sources[1].prefix is an empty list"),
    (SEVERAL % "[{prefix: /x/py, weight: many}]", "config.data.sources[1].prefix[0].weight must be a number"),
    (SEVERAL % "[{prefix: /x/py}, {weight: 2}]", "data.sources[1].prefix[1].prefix is empty"),
    (SEVERAL % "[{prefix: /x/py}, {prefix: /x/py}]", "data.sources[1].prefix[1].prefix='/x/py' is listed twice"),
    (SEVERAL % "[{path: /x/py}]", "unknown field config.data.sources[1].prefix[0].path (known: prefix, weight)"),
])
def test_bad_fields_are_named(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, BASE + [override])
    assert message in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: invalid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=f"{unknown}: unknown field config.trainer"):
        load_config(unknown)


def test_errors_name_the_override_or_the_file_the_value_came_from(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\n  norm: batchnorm\ndata:\n  tokenizer: t.model\n"
                    "  sources:\n    - {name: text, prefix: /p/text}\n")
    for overrides, origin in (([], f"{path}: "), (["--model.norm=rmsnorm", "--model.bogus=1"], "override --model.bogus=1: "),
                              (["--model.norm=rmsnorm", "--modle.norm=x"], "override --modle.norm=x: "),
                              (["--model.norm=rmsnorm", "--train.steps=many"], "override --train.steps=many: "),
                              (["--model.norm=rmsnorm", "--model.num_kv_heads=3"], "override --model.num_kv_heads=3: "),
                              (["--train.steps=9"], f"{path}: model.norm='batchnorm'")):
        with pytest.raises(ConfigError) as err:
            load_config(path, overrides)
        assert str(err.value).startswith(origin), (overrides, str(err.value))


def test_empty_sources_rejected():
    with pytest.raises(ConfigError, match="data.sources is empty"):
        load_config(None, ["--data.tokenizer=x"])


def test_presets_are_valid_and_sized():
    from megatron_code.config import ModelConfig
    from megatron_code.model import GPT
    import torch
    for name, fields in PRESETS.items():
        ModelConfig(**fields).validate()
    # Parameter counts of the named sizes, from the config alone (meta device: no memory).
    with torch.device("meta"):
        counts = {n: GPT(ModelConfig(**PRESETS[n], vocab_size=32000)).num_parameters() / 1e9
                  for n in ("125m", "1.3b", "2.6b-pangu", "2.8b", "7b", "13b-pangu")}
    assert 0.10 < counts["125m"] < 0.16
    assert 1.2 < counts["1.3b"] < 1.5
    assert 2.5 < counts["2.6b-pangu"] < 2.8
    assert 6.5 < counts["7b"] < 7.0
    assert 2.6 < counts["2.8b"] < 2.9 and 12.5 < counts["13b-pangu"] < 13.3
