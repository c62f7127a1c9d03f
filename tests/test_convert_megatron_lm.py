"""tools/convert_checkpoint.py against megatron-core itself: Megatron-LM checkpoints made by
megatron-core on CPU ranks (tests/megatron_core_checkpoints.py) import with megatron-core's own
logits at their layout and go on to transformers; our checkpoints export to Megatron-LM and load
into megatron-core at another layout with our logits; round trips give identical tensors; what
we cannot express is refused by name."""
import argparse
import contextlib
import io
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from megatron_core_checkpoints import ITERATION, megatron_args, run_in_this_process, save_and_load_rank, save_rank

from megatron_code.model import GPT
from megatron_code.model import megatron_lm as layout
from megatron_code.model.hf import ConversionError
from megatron_code.training.megatron_lm_checkpoint import load_pickle, read_megatron_lm
from megatron_code.training.weights import read_checkpoint

TOLERANCE = 1e-4
# Three layouts between them: both norms, both position embeddings, tied and untied, multi-head
# and grouped-query attention, tensor 1 and 2, pipeline 1 and 2 with virtual stages. LayerNorm
# with SwiGLU and learned positions has no transformers class: it stops at our checkpoint.
LLAMA = dict(normalization="RMSNorm", position_embedding_type="rope", untie=True, groups=4)
LAYERNORM = dict(normalization="LayerNorm", position_embedding_type="learned_absolute", untie=False, groups=4)
SPLIT = dict(tensor=2, pipeline=2, virtual=2, normalization="RMSNorm", position_embedding_type="rope", untie=False,
             groups=2)
LAYOUTS = {"tp1": LLAMA, "tp1layernorm": LAYERNORM, "tp2pp2vp2": SPLIT}


def tokens_for_reference() -> torch.Tensor:
    return torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(3))


def saved_in_this_process(out: Path, args) -> tuple[Path, torch.Tensor, torch.Tensor]:
    tokens = tokens_for_reference()
    return out, tokens, torch.from_numpy(run_in_this_process(save_rank, str(out), args, tokens, ("torch",)))


@pytest.fixture(scope="module")
def megatron_tp1(tmp_path_factory):
    """Tensor 1 x pipeline 1, Llama style, saved by megatron-core in this process: (save folder,
    tokens, megatron-core's logits)."""
    return saved_in_this_process(tmp_path_factory.mktemp("megatron_tp1"), megatron_args(**LLAMA))


@pytest.fixture(scope="module")
def megatron_tp1layernorm(tmp_path_factory):
    return saved_in_this_process(tmp_path_factory.mktemp("megatron_layernorm"), megatron_args(**LAYERNORM))


@pytest.fixture(scope="module")
def four_ranks(trained_run, convert_tool, tmp_path_factory):
    """Both directions at tensor 2 x pipeline 2 in one spawn of 4 gloo ranks: megatron-core saves
    SPLIT (x 2 virtual stages) in both formats and computes its logits there, then loads
    `trained_run` exported by the tool in both formats (the tool's own check passed) and computes
    its logits from them. Returns (SPLIT's save folder, tokens, its logits, the export folder, the
    export's args, [torch, torch_dist] logits of the export on every rank)."""
    from distributed_utils import run_distributed

    save, exported = tmp_path_factory.mktemp("megatron_tp2_pp2"), tmp_path_factory.mktemp("to_megatron")
    for fmt in ("torch", "torch_dist"):  # trained_run: 2 layers, tied embeddings, GQA, 1100 rows
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # the ranks below load both: the tool checks one
            assert convert_tool.main(["export", "--format", "megatron-lm", "--load", str(trained_run), "--out",
                                      str(exported / fmt), "--tensor", "2", "--pipeline", "2", "--ckpt-format", fmt,
                                      "--transformer-impl", "local", *(["--no-verify"] if fmt == "torch_dist" else [])]) == 0
        if fmt == "torch":
            assert "greedy 32 tokens: identical" in printed.getvalue(), printed.getvalue()
    export_args = load_pickle(exported / "torch" / f"iter_{16:07d}" / "mp_rank_00_000" / "model_optim_rng.pt")["args"]
    tokens = tokens_for_reference()
    saves = [(str(exported / fmt), fmt) for fmt in ("torch", "torch_dist")]
    results = run_distributed(save_and_load_rank, world_size=4, timeout_s=600, child_processes=True,
                              args=((str(save), megatron_args(**SPLIT), tokens, ("torch", "torch_dist")),
                                    (saves, export_args, tokens)))
    saved_logits = [saved for saved, _ in results]
    assert all((x == saved_logits[0]).all() for x in saved_logits)
    return save, tokens, torch.from_numpy(saved_logits[0]), exported, export_args, [loaded for _, loaded in results]


@pytest.fixture(scope="module")
def megatron_tp2pp2vp2(four_ranks):
    """Layout tensor 2 x pipeline 2 x 2 virtual stages, saved by megatron-core on 4 gloo ranks in
    both formats: (save folder, tokens, megatron-core's logits at that layout)."""
    return four_ranks[:3]


def our_logits(run: Path, tokens: torch.Tensor) -> torch.Tensor:
    weights = read_checkpoint(run)
    model = GPT(weights.config.model)
    model.load_state_dict(weights.state)
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("case", ["torch-tp1", "torch-tp1layernorm", "torch-tp2pp2vp2", "torch_dist-tp2pp2vp2"])
def test_import_matches_megatron_core_and_goes_on_to_transformers(case, request, convert_tool, tiny_corpus, tmp_path,
                                                                  capsys):
    fmt, layout_name = case.split("-")
    save, tokens, reference = request.getfixturevalue(f"megatron_{layout_name}")
    run = tmp_path / "run"
    assert convert_tool.main(["import", "--megatron-lm", str(save / fmt), "--tokenizer", str(tiny_corpus.tokenizer),
                              "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    assert f"({fmt}, iteration {ITERATION}, tensor " in printed
    assert "against megatron-core's GPTModel" in printed and "greedy 32 tokens: identical" in printed
    assert float(re.search(r"max \|logit difference\| (\S+)", printed).group(1)) <= TOLERANCE

    config = read_checkpoint(run).config.model
    args = megatron_args(**LAYOUTS[layout_name])
    assert (config.vocab_size, config.tokenizer_vocab_size) == (args.padded_vocab_size, 1024)
    assert config.tie_embeddings == (not args.untie_embeddings_and_output_weights)
    assert config.norm == args.normalization.lower() and config.kv_heads == args.num_query_groups
    # megatron-core's forward at the checkpoint's own layout (the tool checks the merged weights)
    assert (our_logits(run, tokens) - reference).abs().max() <= TOLERANCE
    if layout_name == "tp1layernorm" or fmt == "torch_dist":  # the legacy case of that layout goes on
        return

    hf = tmp_path / "hf"  # the road on to transformers
    assert convert_tool.main(["export", "--load", str(run), "--out", str(hf)]) == 0
    assert "greedy 32 tokens: identical" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(input_ids=tokens).logits - reference[..., :1024]).abs().max() <= TOLERANCE


def rank_tensors(save: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every model tensor of a legacy save folder: rank folder -> {model key.name: tensor}."""
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    out = {}
    for f in sorted((save / f"iter_{iteration:07d}").glob("mp_rank_*/model_optim_rng.pt")):
        stored = torch.load(f, weights_only=False)
        out[f.parent.name] = {f"{key}.{name}": value for key, model in stored.items() if key.startswith("model")
                              for name, value in model.items() if isinstance(value, torch.Tensor)}
    return out


@pytest.mark.parametrize("case", ["tp1", "tp1layernorm", "tp2pp2vp2"])
def test_megatron_to_ours_to_megatron_is_identical(case, request, convert_tool, tiny_corpus, tmp_path):
    save = request.getfixturevalue(f"megatron_{case}")[0] / "torch"
    run, back = tmp_path / "run", tmp_path / "back"
    assert convert_tool.main(["import", "--megatron-lm", str(save), "--tokenizer", str(tiny_corpus.tokenizer),
                              "--out", str(run), "--no-verify"]) == 0
    split = [] if case.startswith("tp1") else ["--tensor", "2", "--pipeline", "2", "--virtual-stages", "2"]
    assert convert_tool.main(["export", "--format", "megatron-lm", "--load", str(run), "--out", str(back),
                              "--transformer-impl", "local", "--no-verify", *split]) == 0
    original, written = rank_tensors(save), rank_tensors(back)
    assert sorted(original) == sorted(written)
    for rank, tensors in original.items():
        assert sorted(tensors) == sorted(written[rank]), rank
        for name, tensor in tensors.items():
            assert torch.equal(written[rank][name], tensor), f"{rank}/{name}"


def test_export_loads_into_megatron_core_with_our_logits(four_ranks, trained_run):
    """megatron-core built from the arguments the export records, at its tensor 2 x pipeline 2
    layout, loads each rank's files its own way and computes our logits."""
    _, tokens, _, exported, args, logits = four_ranks
    dist_args = load_pickle(exported / "torch_dist" / f"iter_{16:07d}" / "common.pt")["args"]
    assert vars(dist_args) == {**vars(args), "ckpt_format": "torch_dist"}
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.padded_vocab_size) == (2, 2, 1100)
    ours = our_logits(trained_run, tokens)
    for rank_logits in logits:
        for fmt, fmt_logits in zip(("torch", "torch_dist"), rank_logits):
            assert (torch.from_numpy(fmt_logits) - ours).abs().max() <= TOLERANCE, fmt


def test_transformer_engine_names_are_megatron_cores(megatron_tp1layernorm, convert_tool, tiny_corpus, tmp_path, capsys):
    """A legacy checkpoint with Transformer Engine's layer names (megatron-core's own map from the
    local spec: the norms fused into linear_qkv / linear_fc1) and its `_extra_state` entries, and
    norms stored as w - 1 (--apply-layernorm-1p), imports to the same weights as the local one;
    the export's Transformer Engine names are the same map."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    key_map = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    save = megatron_tp1layernorm[0]
    te = tmp_path / "te"
    shutil.copytree(save / "torch", te)
    rank_file = te / f"iter_{ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    stored = torch.load(rank_file, weights_only=False)
    model = {}
    for name, value in stored["model"].items():
        if isinstance(value, torch.Tensor) and name.endswith("layernorm.weight"):
            value = value - 1
        for local, fused in key_map.items():
            name = name.replace(local, fused)
        model[name] = value
    model["decoder.layers.0.self_attention.core_attention._extra_state"] = io.BytesIO(b"fp8 meta")
    stored["model"] = model
    stored["args"].layernorm_zero_centered_gamma = True
    stored["args"].transformer_impl = "transformer_engine"
    torch.save(stored, rank_file)

    runs = {}
    for name, folder, check in (("local", save / "torch", ["--no-verify"]), ("te", te, [])):
        runs[name] = tmp_path / f"run_{name}"
        assert convert_tool.main(["import", "--megatron-lm", str(folder), "--tokenizer", str(tiny_corpus.tokenizer),
                                  "--out", str(runs[name]), *check]) == 0
    printed = capsys.readouterr().out
    assert "lack --apply-layernorm-1p; its model holds the norms as w = stored + 1" in printed
    assert "greedy 32 tokens: identical" in printed
    local, fused = read_checkpoint(runs["local"]).state, read_checkpoint(runs["te"]).state
    assert sorted(local) == sorted(fused)
    for name in local:
        torch.testing.assert_close(fused[name], local[name], rtol=0, atol=1e-6, msg=name)

    back = tmp_path / "back"
    assert convert_tool.main(["export", "--format", "megatron-lm", "--load", str(runs["local"]), "--out", str(back),
                              "--no-verify"]) == 0  # --transformer-impl transformer_engine by default
    written = rank_tensors(back)["mp_rank_00"]
    expected = {f"model.{n}" for n, v in model.items() if isinstance(v, torch.Tensor)}
    assert set(written) == expected


def test_training_continues_from_a_megatron_import(megatron_tp1layernorm, convert_tool, tiny_corpus, train_args, tmp_path):
    from megatron_code.config import load_config
    from megatron_code.training.trainer import Trainer

    run = tmp_path / "imported"
    assert convert_tool.main(["import", "--megatron-lm", str(megatron_tp1layernorm[0] / "torch"), "--tokenizer",
                              str(tiny_corpus.tokenizer), "--out", str(run), "--no-verify"]) == 0
    # as the README runs it: the model and tokenizer come from the import's config.yaml alone
    overrides = [a for a in train_args(tmp_path / "continued", "--train.steps=2", "--optim.warmup_steps=1",
                                       f"--checkpoint.init_from={run}")
                 if not a.startswith(("--model.preset=", "--data.tokenizer="))]
    trainer = Trainer(load_config(run / "config.yaml", overrides))
    assert trainer.config.model.norm == "layernorm" and trainer.config.model.position_embedding == "learned"
    assert Path(trainer.config.data.tokenizer).is_relative_to(run)
    model = trainer.model.state_dict()
    for name, value in read_checkpoint(run).state.items():
        assert torch.equal(model[name], value), name
    result = trainer.train()
    assert result.step == 2 and all(np.isfinite(result.losses))


def refused(**changes) -> str:
    args = megatron_args(**{k: v for k, v in changes.items() if k in ("normalization", "position_embedding_type")})
    for name, value in changes.items():
        setattr(args, name, value)
    with pytest.raises(ConversionError) as e:
        layout.config_from_args(args, 0)
    return str(e.value)


@pytest.mark.parametrize("changes, line", [
    ({"add_bias_linear": True}, "args.add_bias_linear=True (Megatron-LM's default; --disable-bias-linear turns it off)"),
    ({"add_qkv_bias": True}, "--add-qkv-bias"),
    ({"qk_layernorm": True}, "--qk-layernorm"),
    ({"num_experts": 8}, "--num-experts (args.num_experts=8): mixture-of-experts layers"),
    ({"multi_latent_attention": True}, "--multi-latent-attention"),
    ({"use_legacy_models": True}, "--use-legacy-models"),
    ({"swiglu": False}, "no --swiglu (args.swiglu=False): megatron-core's MLP is then the exact (erf) GELU"),
    ({"squared_relu": True, "swiglu": False}, "--squared-relu"),
    ({"rotary_percent": 0.5}, "--rotary-percent 0.5: our RoPE rotates the whole head"),
    ({"rotary_interleaved": True}, "--rotary-interleaved"),
    ({"use_rope_scaling": True}, "--use-rope-scaling"),
    ({"kv_channels": 32}, "--kv-channels 32"),
    ({"normalization": "L2Norm"}, "--normalization L2Norm"),
    ({"position_embedding_type": "none"}, "--position-embedding-type none"),
    ({"window_size": (128, 0)}, "--window-size"),
    ({"softmax_type": "learnable"}, "--softmax-type learnable"),
    ({"apply_residual_connection_post_layernorm": True}, "--apply-residual-connection-post-layernorm"),
    ({"mtp_num_layers": 1}, "--mtp-num-layers"),
])
def test_import_refuses_what_our_model_cannot_express(changes, line):
    message = refused(**changes)
    assert line in message
    assert len(message.splitlines()) == 1


def test_every_problem_is_named_at_once():
    message = refused(add_bias_linear=True, qk_layernorm=True, rotary_percent=0.5)
    assert len(message.splitlines()) == 4


def test_import_errors(megatron_tp1, convert_tool, tiny_corpus, tmp_path, capsys):
    save = megatron_tp1[0] / "torch"

    def run_import(folder, *extra) -> str:
        assert convert_tool.main(["import", "--megatron-lm", str(folder), "--tokenizer", str(tiny_corpus.tokenizer),
                                  "--out", str(tmp_path / "run"), "--no-verify", *extra]) == 1
        assert not (tmp_path / "run").exists()
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "latest_checkpointed_iteration.txt: no such file" in run_import(save / f"iter_{ITERATION:07d}")
    assert "iter_0000003: no such iteration directory" in run_import(save, "--iteration", "3")

    broken = tmp_path / "broken"
    shutil.copytree(save, broken)
    iteration = broken / f"iter_{ITERATION:07d}"
    shutil.copytree(iteration / "mp_rank_00", iteration / "mp_rank_01")
    assert "its args say tensor_model_parallel_size=1, pipeline_model_parallel_size=1" in run_import(broken)
    (iteration / "mp_rank_01" / "model_optim_rng.pt").unlink()
    assert "1 rank file(s) missing: mp_rank_01/model_optim_rng.pt" in run_import(broken)
    shutil.rmtree(iteration / "mp_rank_01")
    shutil.copytree(iteration / "mp_rank_00", iteration / "mp_rank_00_000_001")
    assert "expert-parallel ranks" in run_import(broken)
    shutil.rmtree(iteration / "mp_rank_00_000_001")

    assert convert_tool.main(["import", "--megatron-lm", str(save), "--out", str(tmp_path / "run")]) == 1
    assert "pass --tokenizer FILE_OR_DIR: the run's args name no tokenizer_model" in capsys.readouterr().err

    rank_file = iteration / "mp_rank_00" / "model_optim_rng.pt"
    stored = torch.load(rank_file, weights_only=False)
    fc2 = stored["model"].pop("decoder.layers.3.mlp.linear_fc2.weight")
    torch.save(stored, rank_file)
    assert "lacks 1 tensor(s) the arguments need: decoder.layers.3.mlp.linear_fc2.weight" in run_import(broken)
    stored["model"]["decoder.layers.3.mlp.linear_fc2.weight"] = fc2
    stored["model"]["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(192)
    torch.save(stored, rank_file)
    assert "tensors our model has no place for: decoder.layers.0.self_attention.linear_qkv.bias" in run_import(broken)
    stored["args"].qk_layernorm = True
    torch.save(stored, rank_file)
    assert "--qk-layernorm (args.qk_layernorm=True): our attention has no query/key norms" in run_import(broken)


def test_megatron_lm_export_errors(trained_run, convert_tool, tmp_path, capsys):
    def run_export(*extra) -> str:
        assert convert_tool.main(["export", "--format", "megatron-lm", "--load", str(trained_run), "--out",
                                  str(tmp_path / "out"), *extra]) == 1
        assert not (tmp_path / "out").exists()
        return capsys.readouterr().err

    assert "--tensor 3 does not divide padded_vocab_size (model.vocab_size)=1100" in run_export("--tensor", "3")
    assert "num_layers=2 does not split evenly over --pipeline 2 x 2 virtual stages" in run_export(
        "--pipeline", "2", "--virtual-stages", "2")
    with pytest.raises(SystemExit):
        convert_tool.main(["export", "--load", str(trained_run), "--out", str(tmp_path / "out"), "--tensor", "2"])
    assert "--tensor only apply to Megatron-LM checkpoints" in capsys.readouterr().err


def test_reading_runs_no_code_of_the_checkpoint(tmp_path):
    """A pickle naming a function (here shutil.rmtree) reads with an inert placeholder in its
    place; one naming a module torch blocks outright (os) is refused with one line."""
    import os

    class Remove:
        def __reduce__(self):
            return shutil.rmtree, (str(tmp_path / "keep"),)

    class System:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    (tmp_path / "keep").mkdir()
    torch.save({"args": argparse.Namespace(num_layers=2), "payload": Remove()}, tmp_path / "evil.pt")
    loaded = load_pickle(tmp_path / "evil.pt")
    assert loaded["args"].num_layers == 2 and (tmp_path / "keep").is_dir()
    assert type(loaded["payload"]).__name__ == "rmtree"
    torch.save({"payload": System()}, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match=r"evil.pt: refused to unpickle \(.*posix.system"):
        load_pickle(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_reader_agrees_with_megatron_cores_own_dist_checkpointing(megatron_tp2pp2vp2):
    """The torch_dist folder read without megatron-core equals the legacy files of the same
    model, and equals what megatron-core's dist_checkpointing.load_plain_tensors reads."""
    from megatron.core import dist_checkpointing

    save = megatron_tp2pp2vp2[0]
    legacy, sharded = read_megatron_lm(save / "torch"), read_megatron_lm(save / "torch_dist")
    assert (sharded.tensor, sharded.pipeline, sharded.virtual) == (2, 2, 2)
    assert sorted(legacy.state) == sorted(sharded.state)
    for name, tensor in legacy.state.items():
        assert torch.equal(sharded.state[name], tensor), name
    folder = str(save / "torch_dist" / f"iter_{ITERATION:07d}")
    with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):  # as Megatron-LM allows
        warnings.simplefilter("ignore")
        plain = run_in_this_process(lambda rank, world: dist_checkpointing.load_plain_tensors(folder))
    stacked = layout.to_sharded(legacy.state, legacy.config)
    for name, tensor in stacked.items():
        assert torch.equal(plain[name], tensor), name
