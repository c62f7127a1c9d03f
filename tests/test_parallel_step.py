"""One training step under data, pipeline and tensor parallel layouts on CPU ranks (gloo), against
independent references: gradients are the float64 gradient of the global batch's per-token mean
whatever share of loss tokens each micro batch holds; zero2/zero3 hold only shards between micro
batches, under pipelining too; sequence-parallel norm gradients are reduced once per step, in one
bucket; the model is built on the meta device and materialized one parameter at a time, to the
values one process draws.
"""
import collections
import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_utils import run_distributed  # noqa: E402

VOCAB, SEQ, GLOBAL_BATCH = 256, 16, 8
LOSS_TOKENS = [16, 1, 9, 2, 16, 3, 5, 12]
"""Loss tokens of each sample (one sample per micro batch): shares far from equal."""


def step_config(tensor=1, pipeline=1, dp_shard="none", grad_reduce="micro_batch", sequence_parallel=False,
                world_size=1, **model):
    from megatron_code.config import (PRESETS, Config, DataConfig, ModelConfig, ParallelConfig, SourceConfig,
                                      TrainConfig)

    config = Config(model=ModelConfig(**{**PRESETS["tiny"], "num_layers": 4, "vocab_size": VOCAB, **model}),
                    parallel=ParallelConfig(tensor=tensor, pipeline=pipeline, dp_shard=dp_shard,
                                            grad_reduce=grad_reduce, sequence_parallel=sequence_parallel),
                    data=DataConfig(sources=[SourceConfig("random", "(random tokens)")], tokenizer="(none)",
                                    seq_length=SEQ),
                    train=TrainConfig(micro_batch_size=1, global_batch_size=GLOBAL_BATCH))
    config.validate(world_size=world_size)
    return config


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    loss_mask = (torch.arange(SEQ)[None] >= SEQ - torch.tensor(LOSS_TOKENS)[:, None]).float()  # answers at the end
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask,
            "position_ids": torch.arange(SEQ).expand(GLOBAL_BATCH, -1),
            "source": torch.zeros(GLOBAL_BATCH, dtype=torch.long)}


def micro_batches(dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's share of the global batch, one sample per micro batch."""
    batch, share = global_batch(), GLOBAL_BATCH // dp_size
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(dp_rank * share, (dp_rank + 1) * share)]


def reference_step(config, weights: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """float64, written out: the sum of every loss token's cross-entropy in the global batch over
    their count, and its gradient by autograd on the single-process model."""
    from megatron_code.model import GPT

    model = GPT(config.model).double()
    model.load_state_dict(weights)
    batch = global_batch()
    logits = model(batch["tokens"], batch["position_ids"])
    token_losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten().double()
    loss = (token_losses * mask).sum() / mask.sum()
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered_over_dp(tensor: torch.Tensor) -> bool:
    """Whole on this rank as far as data parallel goes: not an FSDP shard."""
    from torch.distributed.tensor import DTensor

    return not (isinstance(tensor, DTensor) and "dp" in (tensor.device_mesh.mesh_dim_names or ()))


def watch_micro_batches(parts) -> list[dict]:
    """At the start of every micro batch's forward of every stage: how many layer parameters are
    gathered (not FSDP shards), and how many parameters hold a gradient, gathered or sharded."""
    seen = []

    def look(part, args, kwargs):
        layer_params = [p for p in part.layers.parameters()]
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        seen.append({"gathered_layer_params": sum(gathered_over_dp(p) for p in layer_params),
                     "grads": len(grads), "gathered_grads": sum(gathered_over_dp(g) for g in grads)})
    for part in parts:
        part.register_forward_pre_hook(look, prepend=True, with_kwargs=True)
    return seen


def one_step(layout: dict) -> dict:
    """Build the layout, run one step's forward and backward on this rank's micro batches, and
    return the full gradients by parameter name, the initial weights and what `watch_micro_batches` saw."""
    from megatron_code.parallel.distributed import build_runtime
    from megatron_code.parallel.model import build_model
    from megatron_code.training.loss import LossTotals

    world = int(os.environ.get("WORLD_SIZE", 1))
    config = step_config(world_size=world, **layout)
    runtime = build_runtime("cpu", config.parallel.tensor, config.parallel.pipeline)
    model = build_model(config, runtime, contextlib.nullcontext)
    weights = {k: full(v).clone() for k, v in model.state_dict().items()}
    seen = watch_micro_batches(model.parts)
    totals = LossTotals(1, runtime.device)
    model.forward_backward(micro_batches(runtime.coordinate("dp"), runtime.size("dp")), totals)
    totals.all_reduce(model.reports_loss, torch.zeros(1, dtype=torch.float64))  # as the trainer does
    sums, counts = totals.totals.sum(1).tolist()
    grads = {name: full(p.grad) for part in model.parts for name, p in part.named_parameters()}
    # numpy crosses the process boundary by value (torch tensors would go through shared memory
    # that the rank's exit takes away)
    return {"grads": {k: v.numpy() for k, v in grads.items()}, "weights": {k: v.numpy() for k, v in weights.items()},
            "seen": seen, "loss": sums / counts}


def _steps(rank: int, world_size: int, layouts: list[dict]) -> list[dict]:
    return [one_step(layout) for layout in layouts]


def merged(results: list[dict], key: str) -> dict[str, torch.Tensor]:
    """One dict over the ranks (pipeline stages hold different parameters)."""
    out = {}
    for result in results:
        out.update({k: torch.as_tensor(v) for k, v in result[key].items()})
    return out


def assert_reference_gradients(results: list[dict]) -> None:
    weights, grads = merged(results, "weights"), merged(results, "grads")
    loss, expected = reference_step(step_config(), weights)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        error = ((grads[name].double() - grad).norm() / grad.norm()).item()
        assert error < 1e-5, f"{name}: relative difference {error:.2e} from the float64 global per-token mean"
    for result in results:  # the step's reported loss, on every rank
        assert result["loss"] == pytest.approx(loss, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# the loss normalization


@pytest.fixture(scope="module")
def one_process() -> dict:
    return one_step({})


def test_one_process_gradients_are_the_global_per_token_mean(one_process):
    """Eight micro batches holding 1 to 16 loss tokens: the accumulated gradient is the float64
    gradient of the global batch's mean over its 64 loss tokens (a loss normalized per micro
    batch would weight each of the single token's micro batch 16 times a token of a full one)."""
    assert_reference_gradients([one_process])


FOUR_RANK_LAYOUTS = {
    "dp4-zero3": {"dp_shard": "zero3"},
    "pp2-dp2-zero3": {"pipeline": 2, "dp_shard": "zero3"},
    "pp2-dp2-zero3-step": {"pipeline": 2, "dp_shard": "zero3", "grad_reduce": "step"},
    "tp2-sp-dp2-zero2": {"tensor": 2, "sequence_parallel": True, "dp_shard": "zero2"},
}


@pytest.fixture(scope="module")
def four_rank_steps() -> dict[str, list[dict]]:
    """Every rank's results of one step of each layout."""
    by_rank = run_distributed(_steps, world_size=4, timeout_s=600, args=(list(FOUR_RANK_LAYOUTS.values()),))
    return {name: [rank[i] for rank in by_rank] for i, name in enumerate(FOUR_RANK_LAYOUTS)}


@pytest.mark.parametrize("layout", FOUR_RANK_LAYOUTS)
def test_parallel_gradients_are_the_global_per_token_mean(layout, four_rank_steps):
    """Data-parallel ranks holding 28 and 36 of the batch's 64 loss tokens (dp2), micro batches of
    1 to 16: the gradients, gathered whole, are the float64 global per-token mean's."""
    assert_reference_gradients(four_rank_steps[layout])


@pytest.mark.parametrize("layout", FOUR_RANK_LAYOUTS)
def test_initial_weights_are_the_single_process_ones(layout, four_rank_steps, one_process):
    """Built on the meta device and materialized shard by shard, every layout starts from exactly
    the weights one process draws (seeded per parameter name, drawn in full, then cut)."""
    weights, expected = merged(four_rank_steps[layout], "weights"), merged([one_process], "weights")
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(weights[name], value), name


# ----------------------------------------------------------------------------------------------
# ZeRO's memory between micro batches


@pytest.mark.parametrize("layout", ["dp4-zero3", "pp2-dp2-zero3", "tp2-sp-dp2-zero2"])
def test_zero_holds_only_shards_between_micro_batches(layout, four_rank_steps):
    """grad_reduce=micro_batch: whenever a micro batch's forward starts, no layer's parameters are
    gathered (zero3: resharded after every forward and backward; zero2: after backward) and every
    gradient a rank holds is its shard, already reduce-scattered -- also for the pipeline's later
    micro batches, which torch's schedule would run with the stage gathered and its gradients
    accumulating unsharded."""
    for rank, result in enumerate(four_rank_steps[layout]):
        seen = result["seen"]
        assert seen and all(s["gathered_layer_params"] == 0 for s in seen), (rank, seen)
        assert all(s["gathered_grads"] == 0 for s in seen), (rank, seen)
        assert any(s["grads"] > 0 for s in seen), (rank, seen)  # a forward after a backward saw shards


def test_zero3_step_accumulation_keeps_the_pipeline_stage_gathered(four_rank_steps):
    """grad_reduce=step under pipelining is torch's own schedule: after a backward the stage's
    parameters stay gathered and their gradients accumulate whole (the trade the option makes)."""
    for rank, result in enumerate(four_rank_steps["pp2-dp2-zero3-step"]):
        seen = result["seen"]
        assert any(s["gathered_layer_params"] > 0 and s["gathered_grads"] > 0 for s in seen), (rank, seen)


# ----------------------------------------------------------------------------------------------
# sequence-parallel norm gradients: one bucketed all-reduce per step


def _count_norm_reductions(rank: int, world_size: int) -> dict:
    from megatron_code.parallel.distributed import build_runtime
    from megatron_code.parallel.model import build_model
    from megatron_code.training.loss import LossTotals

    config = step_config(tensor=2, sequence_parallel=True, world_size=world_size)
    runtime = build_runtime("cpu", 2, 1)
    model = build_model(config, runtime, contextlib.nullcontext)
    with torch.profiler.profile(record_shapes=True) as prof:
        model.forward_backward(micro_batches(0, 1)[:3], LossTotals(1, runtime.device))
    sizes = collections.Counter(tuple(e.input_shapes[0]) for e in prof.events()
                                if e.name == "gloo:all_reduce" and e.input_shapes and e.input_shapes[0])
    return {"all_reduce_sizes": dict(sizes)}


def test_sequence_parallel_norm_gradients_are_reduced_once_per_step():
    """tp2 + SP, 3 micro batches, 4 layers: the 9 norm weights' gradients (64 each) are summed in
    one all-reduce of 576 values, none alone (per micro batch, that would be 27 all-reduces)."""
    sizes = run_distributed(_count_norm_reductions, world_size=2, timeout_s=300)[0]["all_reduce_sizes"]
    hidden, norms = 64, 2 * 4 + 1
    assert sizes.get((hidden,), 0) == 0, sizes
    assert sizes.get((norms * hidden,)) == 1, sizes


# ----------------------------------------------------------------------------------------------
# start-up: built on meta, materialized one parameter at a time


def _build_peak(rank: int, world_size: int) -> dict:
    """Resident memory a zero3 build adds, read from /proc: idle (torch imported, group up) to the
    high-water mark after `build_model`."""
    from megatron_code.parallel.distributed import build_runtime
    from megatron_code.parallel.model import build_model

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    config = step_config(dp_shard="zero3", world_size=world_size, hidden_size=1024, num_heads=8, num_kv_heads=8,
                         ffn_hidden_size=4096, vocab_size=4096)
    runtime = build_runtime("cpu", 1, 1)
    idle = status("VmRSS")
    model = build_model(config, runtime, contextlib.nullcontext)
    shard = sum(p.to_local().numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    return {"added": status("VmHWM") - idle, "shard": shard, "largest": largest,
            "whole": model.num_parameters() * 4}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_zero3_start_up_holds_a_shard_plus_one_parameter():
    """2 ranks, zero3, 4 layers of hidden 1024 (71M parameters, 285 MB): building adds at most the
    rank's shard plus one parameter drawn in full and its cut (34 MB each at most), never the
    whole model (whose values it still matches: `test_initial_weights_are_the_single_process_ones`)."""
    for rank in run_distributed(_build_peak, world_size=2, timeout_s=300):
        assert rank["added"] < rank["shard"] + 2 * rank["largest"], rank
        assert rank["added"] < rank["whole"], rank
