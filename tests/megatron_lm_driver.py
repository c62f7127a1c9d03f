"""Megatron-LM's own checkpointing, driven on one CPU process: run by tests/test_megatron_lm.py as
`python megatron_lm_driver.py save|load OUT_LOGITS TOKENS -- <Megatron-LM flags>` with a
Megatron-LM checkout first on PYTHONPATH. Nothing of megatron_code is imported here.

`save`: Megatron-LM parses and validates the flags, builds its GPT model (gpt_builder, the
model_provider of pretrain_gpt.py), writes it with `save_checkpoint` to `--save` and the logits
of its forward on TOKENS to OUT_LOGITS. `load`: the same model loaded by Megatron-LM's
`load_checkpoint` from `--load` (with the flags a user passes to continue elsewhere-trained
weights), and its logits.

Megatron-LM assumes CUDA where a CPU run meets it; patched here, in this process only: the
device of a few small tensors it makes (`device="cuda"` / `torch.cuda.current_device()`),
`Tensor.cuda`, `torch.cuda.synchronize`, the CUDA RNG state it saves, and the CUDA RNG
tracker's `fork` (dropout, off).
"""
import contextlib
import os
import sys
import warnings
from unittest import mock

import torch
import torch.distributed as dist


def _on_cpu(factory):
    def make(*args, **kwargs):
        if "device" in kwargs and str(kwargs["device"]).startswith("cuda") or isinstance(kwargs.get("device"), int):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)
    return make


@contextlib.contextmanager
def cpu_shims():
    from megatron.core.tensor_parallel import random as tp_random

    tracker = tp_random.get_cuda_rng_tracker()
    with mock.patch("torch.cuda.current_device", lambda: "cpu"), \
            mock.patch("torch.cuda.synchronize", lambda *a, **k: None), \
            mock.patch("torch.cuda.get_rng_state", lambda *a, **k: torch.get_rng_state()), \
            mock.patch("torch.cuda.set_rng_state", lambda *a, **k: None), \
            mock.patch("torch.tensor", _on_cpu(torch.tensor)), \
            mock.patch("torch.zeros", _on_cpu(torch.zeros)), \
            mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self), \
            mock.patch.object(tracker, "fork", contextlib.nullcontext), \
            mock.patch.object(tracker, "get_states", lambda: {}):
        yield


def main() -> None:
    mode, logits_file, tokens_file = sys.argv[1:4]
    flags = sys.argv[sys.argv.index("--") + 1:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29571"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    sys.argv = ["pretrain_gpt.py", *flags]
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint, save_checkpoint
    from megatron.training.global_vars import set_global_variables

    from gpt_builders import gpt_builder

    args = parse_args()
    if args.use_checkpoint_args:  # as initialize_megatron does: the model's shape from the checkpoint's args
        load_args_from_checkpoint(args)
    validate_args(args, {})
    if os.environ.get("DRIVER_CKPT_FORMAT"):  # see test_megatron_lm.py: torch_dcp is validated only with FSDP2
        args.ckpt_format, args.use_dist_ckpt = os.environ["DRIVER_CKPT_FORMAT"], True
    set_global_variables(args)
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(args.seed)
    with cpu_shims():
        model = gpt_builder(args, pre_process=True, post_process=True)
        if mode == "save":
            with torch.no_grad():  # norms away from 1, so a misplaced norm shows
                for name, p in model.named_parameters():
                    if "layernorm" in name or "layer_norm" in name:
                        p.uniform_(0.5, 1.5)
            save_checkpoint(5, [model], None, None, 0)
        else:
            load_checkpoint([model], None, None, strict=True)
        tokens = torch.load(tokens_file)
        b, t = tokens.shape
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)[None, None]
        with torch.no_grad():
            logits = model.eval()(tokens, torch.arange(t).expand(b, t), causal)
    # parallel_output=True at tensor-parallel size 1 is the whole vocabulary
    torch.save(logits, logits_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
