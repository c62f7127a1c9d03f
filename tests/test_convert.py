"""tools/convert_checkpoint.py against transformers itself: export of a trained checkpoint
(Llama and GPT-2/PanGu style), import of Llama-architecture models, round trips, refusals and
the errors a user meets."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from megatron_code.config import PRESETS, Config, ModelConfig
from megatron_code.data.tokenizer import load_tokenizer
from megatron_code.evaluation.lm import load_language_model
from megatron_code.model import GPT
from megatron_code.model.hf import ConversionError, from_hf_config, hf_architecture
from megatron_code.training.integrity import file_checksum, write_manifest
from megatron_code.training.weights import read_checkpoint, write_weights_only


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    assert sorted(out) == sorted(index["weight_map"])
    return out


def text_tokens(tokenizer, n: int = 40) -> torch.Tensor:
    """Real text the tool's own verification batch does not use."""
    source = Path(json.__file__).read_text()
    return torch.tensor([tokenizer.encode(source[i * 3000:(i + 1) * 3000])[:n] for i in range(2)])


def test_export_matches_transformers(trained_run, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = read_checkpoint(trained_run)
    assert weights.step == 16 and weights.state["embedding.weight"].shape[0] == 1100
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 1024  # padding cut
    assert len(list(exported.glob("model-*-of-*.safetensors"))) > 1  # --shard-mb 0: a shard per tensor
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == 2

    hf_tokenizer = AutoTokenizer.from_pretrained(exported)
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ours = GPT(weights.config.model)
    ours.load_state_dict(weights.state)
    tokens = text_tokens(hf_tokenizer)
    with torch.no_grad():
        diff = (ours.eval()(tokens)[..., :1024] - hf(input_ids=tokens).logits).abs().max()
        greedy = hf.generate(tokens[:1, :16], max_new_tokens=32, do_sample=False, eos_token_id=None)[0, 16:]
        ids = tokens[:1, :16]
        for _ in range(32):
            ids = torch.cat([ids, ours(ids)[:, -1, :1024].argmax(-1, keepdim=True)], 1)
    assert diff <= 1e-4
    assert torch.equal(greedy, ids[0, 16:])
    assert hf_tokenizer.decode(tokens[0]) == load_tokenizer(exported).decode(tokens[0].tolist())


def _copy_final_checkpoint(trained_run: Path, out: Path, tokenizer_vocab_size: int | None) -> Path:
    """`trained_run`'s final step directory under `out` as a checkpoint saved before manifests,
    its config's model.tokenizer_vocab_size replaced (None: removed, as in a checkpoint saved
    before the field existed)."""
    step = out / "checkpoints" / "step_0000016"
    shutil.copytree(trained_run / "checkpoints" / step.name, step)
    (step / "manifest.json").unlink()
    state = json.loads((step / "trainer_state.json").read_text())
    assert state.pop("manifest") is True
    assert state["config"]["model"].pop("tokenizer_vocab_size") == 1024
    if tokenizer_vocab_size is not None:
        state["config"]["model"]["tokenizer_vocab_size"] = tokenizer_vocab_size
    (step / "trainer_state.json").write_text(json.dumps(state))
    return step


def _resume_args(train_args, out_dir: Path, step: Path) -> list[str]:
    """trained_run's arguments (the same validation samples), loading `step`."""
    return train_args(out_dir, "--model.vocab_size=1100", "--train.steps=16", "--train.micro_batch_size=4",
                      "--train.global_batch_size=4", "--train.eval_batches=1", f"--checkpoint.load={step}")


def test_validation_loss_is_the_exported_models(train_args, trained_run, exported, tmp_path):
    """The trainer's validation loss on the final checkpoint equals transformers' loss of the
    export (1024 rows) on the same samples, and the one training logged: the embedding's padding
    rows (to 1100) take no probability. The checkpoint is loaded as one saved before
    model.tokenizer_vocab_size existed: the trainer takes it from the tokenizer."""
    from megatron_code.config import load_config
    from megatron_code.training.trainer import Trainer

    step = _copy_final_checkpoint(trained_run, tmp_path / "old", None)
    trainer = Trainer(load_config(None, _resume_args(train_args, tmp_path / "resumed", step)))
    assert trainer.step == 16 and trainer.config.model.tokenizer_vocab_size == 1024
    valid = trainer.evaluate()
    logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    for index, name in enumerate(trainer.data.names):
        batch = trainer.data.valid_batch(index)
        tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(hf(input_ids=tokens).logits.transpose(1, 2), labels,
                                                       reduction="none")
        assert valid[name] == pytest.approx(((losses * mask).sum() / mask.sum()).item(), rel=1e-5), name
        assert valid[name] == pytest.approx(logged[-1][f"valid_loss/{name}"], rel=1e-6), name


def test_a_checkpoint_refuses_another_tokenizer(convert_tool, trained_run, tmp_path, capsys):
    """A checkpoint whose model trained over 1000 ids meets its tokenizer's 1024 (the padded
    embedding of 1100 rows would hold either): evaluation and export refuse it by name."""
    from megatron_code.training.checkpoint import CheckpointError

    step = _copy_final_checkpoint(trained_run, tmp_path / "other", 1000)
    problem = f"checkpoint {step} was trained with a tokenizer of 1000 ids; the tokenizer .* has 1024"
    with pytest.raises(CheckpointError, match=problem):
        load_language_model(step)
    assert convert_tool.main(["export", "--load", str(step), "--out", str(tmp_path / "hf")]) == 1
    assert re.search(problem, capsys.readouterr().err) and not (tmp_path / "hf").exists()


def test_export_bf16_and_errors(convert_tool, trained_run, exported, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert convert_tool.main(["export", "--load", str(trained_run / "checkpoints"), "--out", str(out), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "greedy 32 tokens: identical" in printed and "max |logit difference|" in printed
    assert {t.dtype for t in hf_tensors(out).values()} == {torch.bfloat16}

    assert convert_tool.main(["export", "--load", str(trained_run), "--out", str(out)]) == 1  # exists
    assert "exists; pass --overwrite" in capsys.readouterr().err
    step = trained_run / "checkpoints" / "step_0000016"
    partial = tmp_path / "run" / "checkpoints" / "step_0000020.tmp"
    shutil.copytree(step, partial)
    assert convert_tool.main(["export", "--load", str(partial), "--out", str(tmp_path / "x")]) == 1
    assert "incomplete" in capsys.readouterr().err
    assert convert_tool.main(["export", "--load", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 1
    assert "only incomplete saves there: step_0000020.tmp" in capsys.readouterr().err

    state = json.loads((partial / "trainer_state.json").read_text())
    state["config"]["model"]["num_layers"] = 3  # the checkpoint holds two layers
    (partial / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(partial, {f.name: file_checksum(f) for f in partial.iterdir() if f.name != "manifest.json"})
    partial.rename(partial.with_name("step_0000020"))
    assert convert_tool.main(["export", "--load", str(partial.with_name("step_0000020")), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "lacks 6 model tensor(s) the config needs" in err and "model.layers.2.mlp.up.weight" in err

    small = Config(model=ModelConfig(**{**PRESETS["tiny"], "vocab_size": 512}))
    small.data.tokenizer = str(tiny_corpus.tokenizer)
    write_weights_only(tmp_path / "small", GPT(small.model).state_dict(), small)
    assert convert_tool.main(["export", "--load", str(tmp_path / "small"), "--out", str(tmp_path / "x")]) == 1
    assert "has 1024 tokens but the checkpoint's embedding has 512 rows" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_verification_failure_names_the_tensor_family(convert_tool, trained_run, tmp_path, monkeypatch, capsys):
    mapping = convert_tool.to_hf_state

    def broken(state, config, vocab):
        out = mapping(state, config, vocab)
        out["model.layers.1.mlp.down_proj.weight"] = out["model.layers.1.mlp.down_proj.weight"] * 1.5
        return out
    monkeypatch.setattr(convert_tool, "to_hf_state", broken)
    assert convert_tool.main(["export", "--load", str(trained_run), "--out", str(tmp_path / "bad")]) == 2
    captured = capsys.readouterr()
    assert "layers.1.mlp" in captured.out and "suspect layers.1.mlp" in captured.err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))  # nothing half-written


def test_pangu_style_exports_as_gpt2(convert_tool, tiny_corpus, tmp_path, capsys):
    torch.manual_seed(0)
    config = Config(model=ModelConfig(**{**PRESETS["tiny"], "num_kv_heads": 4, "vocab_size": 1100, "norm": "layernorm",
                                         "activation": "gelu", "position_embedding": "learned",
                                         "tie_embeddings": False, "init_std": 0.2}))
    config.data.tokenizer = str(tiny_corpus.tokenizer)
    model = GPT(config.model)
    with torch.no_grad():  # norms away from identity, so a swapped norm weight or bias would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    write_weights_only(tmp_path / "pangu", model.state_dict(), config)
    assert convert_tool.main(["export", "--load", str(tmp_path / "pangu"), "--out", str(tmp_path / "hf")]) == 0
    assert "identical" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    tokens = text_tokens(load_tokenizer(tiny_corpus.tokenizer))
    with torch.no_grad():
        assert (model.eval()(tokens)[..., :1024] - hf(input_ids=tokens).logits).abs().max() <= 1e-4

    grouped = ModelConfig(**{**PRESETS["tiny"], "norm": "layernorm", "activation": "gelu", "position_embedding": "learned"})
    with pytest.raises(ConversionError, match="GPT2LMHeadModel has no grouped-query attention"):
        hf_architecture(grouped)
    with pytest.raises(ConversionError, match="no transformers class expresses norm=rmsnorm, activation=gelu"):
        hf_architecture(ModelConfig(**{**PRESETS["tiny"], "activation": "gelu"}))


def random_hf(folder: Path, tokenizer_dir: Path, config) -> None:
    """A randomly initialized transformers model with non-trivial norms, and our tokenizer."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)


LLAMA = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_import_then_export_is_exact(convert_tool, arch, tiny_corpus, tmp_path, capsys):
    if arch == "llama":
        config = transformers.LlamaConfig(**LLAMA, rope_theta=5000.0, tie_word_embeddings=False)
    else:  # a window as long as the context never applies
        config = transformers.MistralConfig(**LLAMA, sliding_window=128, tie_word_embeddings=True)
    random_hf(tmp_path / "hf", tiny_corpus.hf_tokenizer, config)
    assert convert_tool.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "greedy 32 tokens: identical" in capsys.readouterr().out
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000000" / "trainer_state.json").read_text())
    assert state["weights_only"] is True and state["step"] == 0
    assert state["config"]["model"]["tokenizer_vocab_size"] == 1024  # rows past the tokenizer's are padding
    assert state["config"]["data"]["tokenizer"] == str((tmp_path / "run" / "tokenizer").resolve())

    weights = read_checkpoint(tmp_path / "run")
    assert set(weights.state) == set(GPT(weights.config.model).state_dict())  # no optimizer, nothing else
    ours = GPT(weights.config.model)
    ours.load_state_dict(weights.state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = text_tokens(load_tokenizer(tmp_path / "run" / "tokenizer"))
    with torch.no_grad():
        assert (ours.eval()(tokens) - hf(input_ids=tokens).logits).abs().max() <= 1e-4

    assert convert_tool.main(["export", "--load", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    if config.tie_word_embeddings:  # save_pretrained may store the tied head; we write it once
        original.pop("lm_head.weight", None)
    back = hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_training_continues_from_an_import(convert_tool, tiny_corpus, train_args, tmp_path):
    from megatron_code.config import load_config
    from megatron_code.training.trainer import Trainer

    random_hf(tmp_path / "hf", tiny_corpus.hf_tokenizer, transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True))
    run = tmp_path / "imported"
    assert convert_tool.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(run), "--no-verify"]) == 0
    recorded = json.loads((run / "checkpoints" / "step_0000000" / "trainer_state.json").read_text())["tokenizer"]
    assert recorded == {"fingerprint": load_tokenizer(tiny_corpus.tokenizer).fingerprint, "vocab_size": 1024}
    trainer = Trainer(load_config(run / "config.yaml", train_args(tmp_path / "continued", "--train.steps=3",
                                                                  f"--checkpoint.init_from={run}")))
    model = trainer.model.state_dict()
    for name, value in read_checkpoint(run).state.items():
        assert torch.equal(model[name], value), name
    result = trainer.train()
    assert result.step == 3 and all(np.isfinite(result.losses)) and result.losses[-1] < result.losses[0]


def _train_and_score(rank: int, world_size: int, args: list[str], tokens: torch.Tensor):
    from megatron_code.config import load_config
    from megatron_code.training.trainer import Trainer

    trainer = Trainer(load_config(None, args))
    checkpoint = trainer.train().checkpoint
    sums, counts = trainer.model.evaluate({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                                           "loss_mask": torch.ones(tokens[:, 1:].shape)})
    return str(checkpoint), sums.tolist()


def test_export_of_a_tensor_parallel_checkpoint(convert_tool, tiny_corpus, train_args, tmp_path):
    """Trained and saved on 2 ranks with tensor parallelism, the embedding padded past the
    tokenizer's 1024 ids to 1100 rows (the second rank's shard ends in padding); exported in this
    process, with no process group: transformers' losses on real text equal the 2-rank run's
    evaluation forward, whose loss leaves the padding out."""
    from distributed_utils import run_distributed

    tokens = text_tokens(load_tokenizer(tiny_corpus.tokenizer), n=48)
    args = train_args(tmp_path / "tp2", "--parallel.tensor=2", "--train.steps=2", "--optim.warmup_steps=1",
                      "--train.global_batch_size=2",
                      "--train.eval_interval=0", "--model.vocab_size=1100")
    (checkpoint, sums), _ = run_distributed(_train_and_score, world_size=2, timeout_s=600, args=(args, tokens))
    assert json.loads((Path(checkpoint) / "trainer_state.json").read_text())["layout"] == "tp2-pp1-dp1"
    assert convert_tool.main(["export", "--load", checkpoint, "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.vocab_size == 1024
    with torch.no_grad():
        logits = hf(input_ids=tokens[:, :-1]).logits
    theirs = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").sum(1)
    torch.testing.assert_close(theirs, torch.tensor(sums), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("config, problem", [
    (transformers.LlamaConfig(**LLAMA, attention_bias=True), "attention_bias=true"),
    (transformers.LlamaConfig(**LLAMA, mlp_bias=True), "mlp_bias=true"),
    (transformers.MistralConfig(**LLAMA, sliding_window=32), "sliding_window=32 < max_position_embeddings=128"),
    (transformers.LlamaConfig(**LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64}), "rope_type='llama3'"),
    (transformers.LlamaConfig(**LLAMA, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type='linear'"),
    (transformers.LlamaConfig(**LLAMA, hidden_act="gelu"), "hidden_act='gelu'"),
    (transformers.LlamaConfig(**{**LLAMA, "head_dim": 32}), "head_dim=32"),
    (transformers.Qwen2Config(**LLAMA), "import reads Llama-architecture models"),
])
def test_import_refuses_what_our_model_cannot_express(config, problem):
    with pytest.raises(ConversionError, match=re.escape(problem)):
        from_hf_config(config)


def test_import_errors(convert_tool, tiny_corpus, tmp_path, capsys):
    from safetensors.torch import save_file

    random_hf(tmp_path / "hf", tiny_corpus.hf_tokenizer, transformers.LlamaConfig(**{**LLAMA, "vocab_size": 512}))
    assert convert_tool.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 1
    assert "has 1024 tokens but the embedding has 512 rows" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    random_hf(tmp_path / "hf", tiny_corpus.hf_tokenizer, transformers.LlamaConfig(**LLAMA))
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    assert convert_tool.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 1
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert convert_tool.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
