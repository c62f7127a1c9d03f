"""Convert checkpoints to and from Hugging Face transformers folders, with verified logits.

    python tools/convert_checkpoint.py export --load runs/quickstart/train --out runs/hf/quickstart
    python tools/convert_checkpoint.py import --hf path/to/llama --out runs/llama_init

export reads a checkpoint (a run, checkpoints or step directory) in one process with no GPU,
through DCP's single-process path over the full-shape tensors a checkpoint holds, and writes config.json, safetensors shards with an index,
generation_config.json and the tokenizer files: LlamaForCausalLM for Llama-style models,
GPT2LMHeadModel (zero biases) for the GPT-2/PanGu style; vocabulary padding is cut to the
tokenizer's size. `--dtype` sets the stored precision (fp32 by default).

import reads a Llama-architecture folder (Llama 2/3, Mistral without sliding window, TinyLlama,
SmolLM) and writes a weights-only checkpoint of ours: RUN/checkpoints/step_0000000 (model
tensors, trainer_state.json with "weights_only": true, step 0, the full config and the tokenizer's
fingerprint, which a start from it checks),
RUN/tokenizer/ and RUN/config.yaml (the model section and tokenizer, to train from it).
Whatever our model cannot express (biases, sliding window, RoPE scaling, ...) is refused.

Both directions verify by default (--no-verify skips): transformers on CPU and our model, both
in fp32 with the same (rounded) weights, on a fixed batch of real text: the largest logit
difference must be <= 1e-4 and 32 greedy tokens identical. The numbers are printed; a failure
exits with status 2 and names the first tensor family whose output differs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megatron_code.cli import add_debug_flag, user_error, user_errors
from megatron_code.config import Config
from megatron_code.data.errors import DataError
from megatron_code.data.tokenizer import Tokenizer, export_hf_tokenizer, hf_tokenizer_dir, load_tokenizer
from megatron_code.evaluation.lm import gpt_next_logits, greedy
from megatron_code.evaluation.megatron_core import MegatronCoreReference, ReferenceUnavailable, megatron_core_reference
from megatron_code.model import GPT
from megatron_code.model import megatron_lm
from megatron_code.model.hf import ConversionError, from_hf_config, from_hf_state, hf_config, to_hf_state
from megatron_code.training.checkpoint import CheckpointError, check_tokenizer
from megatron_code.training.integrity import safetensors_files
from megatron_code.training.megatron_lm_checkpoint import read_megatron_lm, write_megatron_lm
from megatron_code.training.weights import read_checkpoint, write_weights_only

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = 1e-4
GREEDY_TOKENS = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


class VerificationFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------- verification


def verification_tokens(tokenizer: Tokenizer, max_length: int, batch: int = 4, length: int = 48) -> torch.Tensor:
    """A fixed batch of real text: prose from Python's own documentation and code from its
    standard library, the same on every machine with the same Python."""
    from pydoc_data.topics import topics
    import textwrap

    texts = [topics["assert"], topics["if"], Path(textwrap.__file__).read_text()[1000:], topics["for"]][:batch]
    ids = [tokenizer.encode(t[:4000]) for t in texts]
    length = min(length, max_length - GREEDY_TOKENS, *(len(i) for i in ids))
    return torch.tensor([i[:length] for i in ids])


@dataclass
class Verification:
    max_abs_diff: float
    ours_greedy: list[int]
    theirs_greedy: list[int]
    suspect: str | None = None

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE and self.ours_greedy == self.theirs_greedy

    def report(self) -> str:
        same = sum(a == b for a, b in zip(self.ours_greedy, self.theirs_greedy))
        lines = [f"verify: max |logit difference| {self.max_abs_diff:.2e} (limit {TOLERANCE:.0e}); "
                 f"greedy {len(self.ours_greedy)} tokens: {'identical' if same == len(self.ours_greedy) else f'{same} equal'}"]
        if self.suspect:
            lines.append(f"verify: FAILED; first tensor family whose output differs: {self.suspect}")
        return "\n".join(lines)


def _first_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _first_output(output):
    return output[0] if isinstance(output, tuple) else output


def _reference_modules(theirs) -> tuple[list, list, object, bool]:
    """(layers, their attention modules, final norm, whether activations are sequence-first) of a
    transformers model (Llama or GPT-2) or megatron-core's GPTModel."""
    if isinstance(theirs, MegatronCoreReference):
        decoder = theirs.model.decoder
        return list(decoder.layers), [layer.self_attention for layer in decoder.layers], decoder.final_layernorm, True
    layers = theirs.model.layers if hasattr(theirs, "model") else theirs.transformer.h
    final_norm = theirs.model.norm if hasattr(theirs, "model") else theirs.transformer.ln_f
    return layers, [getattr(layer, "self_attn", None) or layer.attn for layer in layers], final_norm, False


def locate_difference(ours: GPT, theirs, tokens: torch.Tensor) -> str:
    """The first family (in forward order) whose output differs between the two models."""
    layers, attention, final_norm, sequence_first = _reference_modules(theirs)
    points = [("embedding (token or position embedding)", ours.layers["0"], layers[0], True)]
    for i, layer in ours.layers.items():
        points += [(f"layers.{i}.attention (its norm, qkv split, RoPE or output projection)", layer.attention,
                    attention[int(i)], False),
                   (f"layers.{i}.mlp (its norm, gate/up/down projections)", layer.mlp, layers[int(i)].mlp, False)]
    points.append(("final norm", ours.norm, final_norm, False))
    captured: dict[tuple[int, int], torch.Tensor] = {}
    handles = []
    for p, (_, our_module, their_module, is_input) in enumerate(points):
        for side, module in enumerate((our_module, their_module)):
            def hook(module, args, kwargs, output=None, key=(p, side), is_input=is_input):
                captured[key] = (_first_input(args, kwargs) if is_input else _first_output(output)).detach()
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True) if is_input
                           else module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            ours(tokens)
            theirs(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    for p, (name, *_) in enumerate(points):
        a, b = captured[(p, 0)], captured[(p, 1)]
        b = b.transpose(0, 1) if sequence_first else b  # megatron-core's (sequence, batch, hidden)
        if (a - b).abs().max() > TOLERANCE * max(1.0, float(b.abs().max())):
            return name
    return "output head (lm_head / tied embedding rows)"


def verify(ours: GPT, theirs, tokens: torch.Tensor, vocab_size: int) -> Verification:
    """Compare logits on `tokens` and 32 greedy tokens after its first row's first half."""
    with torch.no_grad():
        ours_logits = ours(tokens)[..., :vocab_size]
        theirs_logits = theirs(input_ids=tokens).logits[..., :vocab_size]
        diff = float((ours_logits - theirs_logits).abs().max())
        prompt = tokens[:1, : tokens.shape[1] // 2]
        theirs_ids = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GREEDY_TOKENS,
                                     do_sample=False, eos_token_id=None)[0, prompt.shape[1]:].tolist()
    (ours_ids,) = greedy(gpt_next_logits(ours, vocab_size), [prompt[0].tolist()], GREEDY_TOKENS, ours.config.max_seq_len)
    result = Verification(diff, ours_ids, theirs_ids)
    if not result.ok:
        result.suspect = locate_difference(ours, theirs, tokens)
    return result


def _load_hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _finish_verification(result: Verification, what: str, reference: str = "transformers") -> None:
    print(result.report())
    if not result.ok:
        raise VerificationFailed(f"{what}: {reference} and our model disagree; suspect {result.suspect}")


# ------------------------------------------------------------------------------------------ export


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")


def _temporary_beside(out: Path) -> Path:
    """Where the result is written before it is renamed to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))


def _replace(tmp: Path, out: Path) -> None:
    tmp.chmod(0o755)  # mkdtemp and safetensors make private files; the result is meant to be shared
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    old = out.with_name(f".{out.name}.old.{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _tokenizer_source(config: Config, override: str | None) -> tuple[Path, Tokenizer]:
    """The tokenizer's files: a SentencePiece .model (its `_hf` folder) or a transformers folder."""
    path = Path(override or config.data.tokenizer).expanduser()
    where = "--tokenizer" if override else "data.tokenizer in the checkpoint's config"
    if not path.exists():
        raise DataError(f"{where}={path}: no such tokenizer (pass --tokenizer FILE_OR_DIR)")
    return path, load_tokenizer(path)


def _copy_tokenizer(source: Path, out: Path) -> None:
    if source.is_file():  # a SentencePiece model: its Hugging Face files, made if missing
        folder = hf_tokenizer_dir(source)
        if not (folder / "tokenizer.json").is_file():
            folder = export_hf_tokenizer(source, out / ".tokenizer")
        source = folder
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    shutil.rmtree(out / ".tokenizer", ignore_errors=True)


def _write_safetensors(state: dict[str, torch.Tensor], out: Path, shard_bytes: int) -> int:
    """Shards of at most `shard_bytes` (one tensor may exceed it) and their index; returns the count."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def export_checkpoint(load: str | Path, out: str | Path, dtype: str = "fp32", overwrite: bool = False,
                      tokenizer: str | None = None, shard_mb: int = 5000, verify_result: bool = True) -> Path:
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(out)
    _refuse_existing(out, overwrite)  # before reading anything
    weights = read_checkpoint(load)
    model_config = weights.config.model
    source, tok = _tokenizer_source(weights.config, tokenizer)
    vocab = tok.vocab_size
    if vocab > model_config.vocab_size:
        raise ConversionError(f"the tokenizer {source} has {vocab} tokens but the checkpoint's embedding has "
                              f"{model_config.vocab_size} rows: it is not this model's tokenizer")
    check_tokenizer(model_config, weights.path, vocab, source)
    special = {f"{name}_token_id": _optional_id(tok, f"{attribute}_id")
               for name, attribute in (("bos", "bos"), ("eos", "eod"), ("pad", "pad"))}
    config = hf_config(model_config, vocab, special)  # refuses what no transformers class expresses
    config.dtype = str(DTYPES[dtype]).removeprefix("torch.")
    print(f"export: {weights.path} (step {weights.step}) -> {out} as {config.architectures[0]}, "
          f"vocabulary {model_config.vocab_size} -> {vocab}, {dtype}")
    state = {k: v.to(DTYPES[dtype]) for k, v in to_hf_state(weights.state, model_config, vocab).items()}
    tmp = _temporary_beside(out)
    try:
        config.save_pretrained(tmp)
        GenerationConfig(**special).save_pretrained(tmp)
        shards = _write_safetensors(state, tmp, shard_mb << 20)
        _copy_tokenizer(source, tmp)
        print(f"export: wrote {len(state)} tensors in {shards} shard(s) and the tokenizer")
        if verify_result:
            ours = GPT(model_config)  # the same rounded weights in fp32, against transformers
            ours.load_state_dict({k: v.to(DTYPES[dtype]).float() for k, v in weights.state.items()})
            AutoTokenizer.from_pretrained(tmp)  # loads with no code of ours
            tokens = verification_tokens(tok, model_config.max_seq_len)
            _finish_verification(verify(ours.eval(), _load_hf_model(tmp), tokens, vocab), "export")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _optional_id(tok: Tokenizer, attribute: str) -> int | None:
    try:
        return getattr(tok, attribute)
    except DataError:  # the tokenizer has no such special token
        return None


# ------------------------------------------------------------------------------------------ import


def _read_hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files, damage = safetensors_files(folder)
    if damage:
        raise ConversionError(damage)
    if not files:
        raise ConversionError(f"{folder}: no safetensors weights (save the model with save_pretrained)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _write_run_config(run: Path, config: Config, **data) -> None:
    """run/config.yaml: the model section and the tokenizer (and any other `data` fields), what a
    run training from the imported weights needs beside its data sources."""
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"model": {k: v for k, v in config.to_dict()["model"].items() if k != "preset"},
         "data": {"tokenizer": config.data.tokenizer, **data}}, sort_keys=False))


def import_checkpoint(hf: str | Path, out: str | Path, overwrite: bool = False, verify_result: bool = True) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    hf, out = Path(hf), Path(out)
    if not (hf / "config.json").is_file():
        raise ConversionError(f"{hf}: not a transformers folder (no config.json)")
    _refuse_existing(out, overwrite)
    hf_cfg = AutoConfig.from_pretrained(hf)
    model_config = from_hf_config(hf_cfg)  # refuses what we cannot express, before reading weights
    tmp = _temporary_beside(out)
    try:
        AutoTokenizer.from_pretrained(hf).save_pretrained(tmp / "tokenizer")
        tok = load_tokenizer(tmp / "tokenizer")
        if tok.vocab_size > hf_cfg.vocab_size:
            raise ConversionError(f"the tokenizer in {hf} has {tok.vocab_size} tokens but the embedding has "
                                  f"{hf_cfg.vocab_size} rows")
        model_config.tokenizer_vocab_size = tok.vocab_size  # rows past it (ours and any of theirs) are padding
        print(f"import: {hf} ({hf_cfg.architectures[0] if hf_cfg.architectures else hf_cfg.model_type}) -> {out}; "
              f"vocabulary {hf_cfg.vocab_size} -> {model_config.vocab_size} rows")
        state = {k: v.float() for k, v in from_hf_state(_read_hf_state(hf), model_config).items()}
        config = Config(model=model_config)
        config.data.tokenizer = str((out / "tokenizer").resolve())
        step_dir = write_weights_only(tmp, state, config, tok)
        _write_run_config(tmp, config)
        print(f"import: wrote {len(state)} tensors to {out / 'checkpoints' / step_dir.name} (weights only)")
        if verify_result:
            written = read_checkpoint(tmp)  # read back through the checkpoint reader
            ours = GPT(written.config.model)
            ours.load_state_dict(written.state)
            tokens = verification_tokens(tok, model_config.max_seq_len)
            _finish_verification(verify(ours.eval(), _load_hf_model(hf), tokens, tok.vocab_size), "import")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

# ------------------------------------------------------------------------------------- Megatron-LM


def verify_with_megatron_core(ours: GPT, args, state: dict[str, torch.Tensor], zero_centered: bool,
                              tokenizer: Tokenizer, what: str) -> None:
    """Our model against megatron-core's GPTModel built from Megatron-LM `args` holding `state`
    (canonical tensors; norms stored as w - 1 when `zero_centered`), as the transformers check."""
    state = {k: v.float() + (1 if zero_centered and megatron_lm.is_norm_weight(k) else 0) for k, v in state.items()}
    if zero_centered:  # megatron-core's CPU norms have no zero-centered option: the same math with w stored
        args = argparse.Namespace(**{**vars(args), "layernorm_zero_centered_gamma": False, "apply_layernorm_1p": False})
        print("verify: megatron-core's CPU norms lack --apply-layernorm-1p; its model holds the norms as w = stored + 1")
    tokens = verification_tokens(tokenizer, ours.config.max_seq_len)
    try:
        with megatron_core_reference(args, state, tokenizer.vocab_size) as theirs:
            print("verify: against megatron-core's GPTModel (local spec, tensor parallel 1, CPU, fp32)")
            result = verify(ours.eval(), theirs, tokens, tokenizer.vocab_size)
    except ReferenceUnavailable as e:
        print(f"verify: skipped: {e}")
        return
    _finish_verification(result, what, "megatron-core")


def _import_tokenizer(source: Path, tmp: Path, out: Path) -> tuple[Path, Tokenizer]:
    """The tokenizer copied into tmp/tokenizer; returns the path a run uses once tmp is `out`."""
    from transformers import AutoTokenizer

    tok = load_tokenizer(source)
    folder = tmp / "tokenizer"
    if source.is_file():  # a SentencePiece model, with the transformers files train_tokenizer writes beside it
        folder.mkdir()
        shutil.copy2(source, folder / source.name)
        if hf_tokenizer_dir(source).is_dir():
            shutil.copytree(hf_tokenizer_dir(source), folder / hf_tokenizer_dir(source).name)
        return (out / "tokenizer" / source.name).resolve(), tok
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return (out / "tokenizer").resolve(), tok


def _megatron_tokenizer(args, override: str | None) -> Path:
    if override:
        path = Path(override).expanduser()
        where = "--tokenizer"
    else:
        model = megatron_lm.arg(args, "tokenizer_model")
        if model is None:
            raise DataError(f"pass --tokenizer FILE_OR_DIR: the run's args name no tokenizer_model (tokenizer_type="
                            f"{megatron_lm.arg(args, 'tokenizer_type')})")
        path, where = Path(model).expanduser(), "the run's --tokenizer-model"
    if not path.exists():
        raise DataError(f"{where}={path}: no such tokenizer file or folder (pass --tokenizer FILE_OR_DIR)")
    return path


def import_megatron_lm(save_dir: str | Path, out: str | Path, tokenizer: str | None = None,
                       iteration: int | None = None, overwrite: bool = False, verify_result: bool = True) -> Path:
    out = Path(out)
    _refuse_existing(out, overwrite)
    checkpoint = read_megatron_lm(save_dir, iteration)  # refuses what we cannot express before reading weights
    config, args = checkpoint.config, checkpoint.args
    source = _megatron_tokenizer(args, tokenizer)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in checkpoint.state.values()})
    print(f"import: {checkpoint.path} ({checkpoint.format}, iteration {checkpoint.iteration}, tensor "
          f"{checkpoint.tensor} x pipeline {checkpoint.pipeline}"
          + (f" x {checkpoint.virtual} virtual stages" if checkpoint.virtual > 1 else "") + f", {'/'.join(dtypes)}) -> {out}")
    dropout = {name: megatron_lm.arg(args, name, 0.0) for name in ("hidden_dropout", "attention_dropout")}
    if any(dropout.values()):
        print("import: note: the run trained with " + ", ".join(f"{k}={v}" for k, v in dropout.items())
              + "; our model has no dropout")
    tmp = _temporary_beside(out)
    try:
        tokenizer_path, tok = _import_tokenizer(source, tmp, out)
        if tok.vocab_size > config.vocab_size:
            raise ConversionError(f"the tokenizer {source} has {tok.vocab_size} tokens but the checkpoint's embedding "
                                  f"has {config.vocab_size} rows: it is not this model's tokenizer")
        config.tokenizer_vocab_size = tok.vocab_size
        print(f"import: vocabulary: tokenizer {tok.vocab_size}, embedding {config.vocab_size} rows (padded_vocab_size)")
        state = {k: v.float() for k, v in megatron_lm.to_ours(checkpoint.state, config, checkpoint.zero_centered_gamma).items()}
        run_config = Config(model=config)
        run_config.data.tokenizer = str(tokenizer_path)
        step_dir = write_weights_only(tmp, state, run_config, tok)
        seq_length = megatron_lm.arg(args, "seq_length", config.max_seq_len)
        _write_run_config(tmp, run_config, **({"seq_length": seq_length} if seq_length <= config.max_seq_len else {}))
        print(f"import: wrote {len(state)} tensors to {out / 'checkpoints' / step_dir.name} (weights only)")
        if verify_result:
            written = read_checkpoint(tmp)  # read back through the checkpoint reader
            ours = GPT(written.config.model)
            ours.load_state_dict(written.state)
            verify_with_megatron_core(ours, args, checkpoint.state, checkpoint.zero_centered_gamma, tok, "import")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_megatron_lm(load: str | Path, out: str | Path, tensor: int = 1, pipeline: int = 1, virtual: int = 1,
                       ckpt_format: str = "torch", transformer_impl: str = "transformer_engine", dtype: str = "fp32",
                       overwrite: bool = False, tokenizer: str | None = None, verify_result: bool = True) -> Path:
    out = Path(out)
    _refuse_existing(out, overwrite)
    weights = read_checkpoint(load)
    config = weights.config.model
    megatron_lm.check_exportable(config)
    megatron_lm.check_tensor_parallel(config, tensor)
    megatron_lm.chunk_layers(config.num_layers, pipeline, virtual)
    source, tok = _tokenizer_source(weights.config, tokenizer)
    check_tokenizer(config, weights.path, tok.vocab_size, source)
    print(f"export: {weights.path} (step {weights.step}) -> {out} as Megatron-LM {ckpt_format}, tensor {tensor} x "
          f"pipeline {pipeline}" + (f" x {virtual} virtual stages" if virtual > 1 else "")
          + (f", {transformer_impl} names" if ckpt_format == "torch" else "") + f", {dtype}")
    state = {k: v.to(DTYPES[dtype]) for k, v in megatron_lm.from_ours(weights.state, config).items()}
    tmp = _temporary_beside(out)
    try:
        path = write_megatron_lm(tmp, state, config, weights.step, ckpt_format, tensor, pipeline, virtual,
                                 transformer_impl)
        print(f"export: wrote {out / path.name} and {out / 'latest_checkpointed_iteration.txt'}")
        if verify_result:
            ours = GPT(config)  # the same rounded weights in fp32, against what megatron-core reads back
            ours.load_state_dict({k: v.to(DTYPES[dtype]).float() for k, v in weights.state.items()})
            written = read_megatron_lm(tmp)
            verify_with_megatron_core(ours, written.args, written.state, written.zero_centered_gamma, tok, "export")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"export: Megatron-LM loads it with --load {out} --no-load-optim --no-load-rng (or --finetune) "
          f"--make-vocab-size-divisible-by {megatron_lm.vocab_divisor(config, tensor)}"
          + (f" --transformer-impl {transformer_impl}" if ckpt_format == "torch" else "")
          + f", the tokenizer {source} and the model flags its args record (--use-checkpoint-args)")
    return out


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="checkpoint of ours -> transformers folder or Megatron-LM checkpoint")
    export.add_argument("--load", required=True, help="run, checkpoints or step_N directory")
    export.add_argument("--out", required=True, help="the transformers folder or Megatron-LM save folder to write")
    export.add_argument("--format", choices=["hf", "megatron-lm"], default="hf", help="what to write (default hf)")
    export.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="stored precision")
    export.add_argument("--tokenizer", help="tokenizer file or folder, when the checkpoint's data.tokenizer moved")
    export.add_argument("--shard-mb", type=int, default=5000, help="hf: largest safetensors shard, in MiB")
    export.add_argument("--tensor", type=int, default=1, help="megatron-lm: tensor-parallel size to split into")
    export.add_argument("--pipeline", type=int, default=1, help="megatron-lm: pipeline-parallel size")
    export.add_argument("--virtual-stages", type=int, default=1,
                        help="megatron-lm: model chunks per pipeline rank (--num-layers-per-virtual-pipeline-stage)")
    export.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch",
                        help="megatron-lm: the legacy per-rank files (torch) or dist_checkpointing (torch_dist)")
    export.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default="transformer_engine",
                        help="megatron-lm, torch format: the layer names of the Megatron-LM run that loads it "
                             "(its --transformer-impl; torch_dist names are the same for both)")
    imp = commands.add_parser("import", help="transformers Llama-architecture folder or Megatron-LM checkpoint -> "
                                             "weights-only checkpoint")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="a folder written by save_pretrained")
    source.add_argument("--megatron-lm", help="a Megatron-LM save folder (holding latest_checkpointed_iteration.txt)")
    imp.add_argument("--iteration", type=int, help="megatron-lm: the iteration to read instead of the latest")
    imp.add_argument("--tokenizer", help="megatron-lm: the run's tokenizer (SentencePiece .model or transformers "
                                         "folder); default: its --tokenizer-model when that exists here")
    imp.add_argument("--out", required=True, help="the run directory to write")
    for sub in (export, imp):
        sub.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
        add_debug_flag(sub)
        sub.add_argument("--no-verify", dest="verify", action="store_false",
                         help="skip the logits and greedy-generation check")
    args = parser.parse_args(argv)
    megatron_only = {"--tensor": args.command == "export" and args.tensor != 1,
                     "--pipeline": args.command == "export" and args.pipeline != 1,
                     "--virtual-stages": args.command == "export" and args.virtual_stages != 1,
                     "--iteration": args.command == "import" and args.iteration is not None,
                     "--tokenizer": args.command == "import" and args.tokenizer is not None}
    is_megatron = getattr(args, "format", None) == "megatron-lm" or getattr(args, "megatron_lm", None)
    given = [flag for flag, set_ in megatron_only.items() if set_]
    if given and not is_megatron:
        parser.error(f"{', '.join(given)} only apply to Megatron-LM checkpoints (--format megatron-lm / --megatron-lm)")
    try:
        if args.command == "export" and is_megatron:
            out = export_megatron_lm(args.load, args.out, args.tensor, args.pipeline, args.virtual_stages,
                                     args.ckpt_format, args.transformer_impl, args.dtype, args.overwrite,
                                     args.tokenizer, args.verify)
        elif args.command == "export":
            out = export_checkpoint(args.load, args.out, args.dtype, args.overwrite, args.tokenizer, args.shard_mb,
                                    args.verify)
        elif is_megatron:
            out = import_megatron_lm(args.megatron_lm, args.out, args.tokenizer, args.iteration, args.overwrite,
                                     args.verify)
        else:
            out = import_checkpoint(args.hf, args.out, args.overwrite, args.verify)
    except VerificationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ConversionError, DataError, FileExistsError) as e:
        return user_error(e)
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
