"""Cross-entropy kernels (reference, Triton, fused linear + CE; vocab-parallel with TP=2 on gloo)
against float64 PyTorch on double copies of the same inputs, with and without vocabulary padding
(the reference sees only the real columns; padding logits are made large, so any mass they took
would show)."""
import os
import sys
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_code.kernels import cross_entropy as ce  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed_utils import run_distributed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = ce.IGNORE_INDEX
SHAPES = [(1, 97), (7, 1000), (33, 1030)]  # (tokens, vocab): none a multiple of the vocab block
TOL = {  # dtype -> (loss rtol/atol, grad rtol, grad atol)
    torch.float32: (1e-5, 1e-5, 1e-6),
    torch.float16: (1e-5, 2e-3, 1e-5),
    torch.bfloat16: (1e-5, 1e-2, 1e-4),
}


def _nan_alloc(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _poison_and_small_blocks(monkeypatch):
    """Kernel outputs start as NaN (an unwritten element fails); 256-wide blocks make every vocab
    here stream over several blocks with a partial last one."""
    monkeypatch.setattr(ce, "_alloc", _nan_alloc)
    monkeypatch.setattr(ce, "_MAX_BLOCK_V", 256)


def _targets(n_tokens: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Random targets, about 1 in 4 ignored, and rows 8..23 (two whole chunks of 8) all ignored."""
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen)
    targets[torch.rand(n_tokens, generator=gen) < 0.25] = IGNORE
    targets[8:24] = IGNORE
    if n_tokens == 1:
        targets[0] = vocab - 1  # the single row keeps a target (last id, last partial block)
    return targets


def _reference_loss(logits64: torch.Tensor, targets: torch.Tensor, z_loss: float,
                    vocab_size: int | None = None) -> torch.Tensor:
    """Per-token float64 loss (differentiable), 0 and no gradient where ignored; over the first
    `vocab_size` columns only (padding columns get no gradient)."""
    logits64 = logits64[:, :vocab_size]
    loss = F.cross_entropy(logits64, targets, ignore_index=IGNORE, reduction="none")
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits64, -1).pow(2) * (targets != IGNORE)
    return loss


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element was never written)"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               msg=lambda detail: f"{what}: {detail}")


def _padded_logits(n_tokens: int, vocab: int, vocab_size: int | None, gen: torch.Generator) -> torch.Tensor:
    """Logits of std 3; columns past `vocab_size` (padding) 10 higher, so unmasked they would
    take most of the softmax."""
    logits = 3 * torch.randn(n_tokens, vocab, generator=gen)
    if vocab_size is not None:
        logits[:, vocab_size:] += 10
    return logits


def _check_cross_entropy(fn, n_tokens, vocab, z_loss, dtype, seed, vocab_size=None, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    logits = _padded_logits(n_tokens, vocab, vocab_size, gen).to(dtype)
    targets = _targets(n_tokens, vocab_size or vocab, gen)
    grad_out = torch.randn(n_tokens, generator=gen)  # arbitrary, non-uniform, signed
    ref_logits = logits.double().requires_grad_()
    ref = _reference_loss(ref_logits, targets, z_loss, vocab_size)
    (ref * grad_out.double()).sum().backward()

    x = logits.to(DEVICE).requires_grad_()
    loss = fn(x, targets.to(DEVICE), z_loss=z_loss, vocab_size=vocab_size, **kwargs)
    (loss * grad_out.to(DEVICE)).sum().backward()
    loss_tol, grad_rtol, grad_atol = TOL[dtype]
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    _close(loss, ref, loss_tol, loss_tol, "loss")
    _close(x.grad, ref_logits.grad, grad_rtol, grad_atol, "grad_logits")
    assert (x.grad[targets == IGNORE] == 0).all()
    assert (x.grad[:, vocab_size or vocab:] == 0).all(), "padding columns must get exactly zero gradient"


# ---------------------------------------------------------------------------------------------
# single rank
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("z_loss", [0.0, 0.02])
@pytest.mark.parametrize("n_tokens,vocab", SHAPES)
@pytest.mark.parametrize("fn", [ce.cross_entropy_torch, ce.cross_entropy_triton], ids=lambda f: f.__name__)
def test_cross_entropy(fn, n_tokens, vocab, z_loss, dtype):
    _check_cross_entropy(fn, n_tokens, vocab, z_loss, dtype, seed=n_tokens * vocab + int(z_loss * 100))


# (tokens, padded vocab, real vocab): padding inside the last 256-wide block, and padding that
# fills whole blocks
PADDED = [(33, 1030, 1000), (7, 1000, 700)]


@pytest.mark.parametrize("z_loss", [0.0, 0.02])
@pytest.mark.parametrize("n_tokens,vocab,vocab_size", PADDED)
@pytest.mark.parametrize("fn", [ce.cross_entropy_torch, ce.cross_entropy_triton], ids=lambda f: f.__name__)
def test_cross_entropy_ignores_vocabulary_padding(fn, n_tokens, vocab, vocab_size, z_loss):
    _check_cross_entropy(fn, n_tokens, vocab, z_loss, torch.float32, seed=vocab_size, vocab_size=vocab_size)


def test_cross_entropy_padding_fp16_and_inplace():
    _check_cross_entropy(ce.cross_entropy_torch, 33, 1030, 0.02, torch.float16, seed=41, vocab_size=1000)
    _check_cross_entropy(ce.cross_entropy_triton, 33, 1030, 0.02, torch.float16, seed=42, vocab_size=1000)
    _check_cross_entropy(ce.cross_entropy_triton, 33, 1030, 0.0, torch.float32, seed=43, vocab_size=1000,
                         inplace_backward=True)


@pytest.mark.parametrize("fn", [ce.cross_entropy_torch, ce.cross_entropy_triton, ce.fused_linear_cross_entropy_torch],
                         ids=lambda f: f.__name__)
def test_vocab_size_beyond_the_logits_is_refused(fn):
    x, targets = torch.randn(3, 16), torch.zeros(3, dtype=torch.long)
    for bad in (0, 17):
        with pytest.raises(ValueError, match=f"vocab_size={bad} must be in 1..16"):
            fn(x, torch.randn(16, 16), targets, vocab_size=bad) if "fused" in fn.__name__ else fn(x, targets,
                                                                                                  vocab_size=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic needs a GPU (the interpreter has none)")
@pytest.mark.parametrize("n_tokens,vocab", [(33, 1030), (64, 50257)])
def test_cross_entropy_triton_bf16_cuda(n_tokens, vocab):
    _check_cross_entropy(ce.cross_entropy_triton, n_tokens, vocab, 1e-3, torch.bfloat16, seed=5)


def test_cross_entropy_triton_default_block_and_inplace(monkeypatch):
    monkeypatch.setattr(ce, "_MAX_BLOCK_V", 4096)  # V=1030 as one 2048-wide block
    _check_cross_entropy(ce.cross_entropy_triton, 33, 1030, 0.02, torch.float32, seed=11)
    _check_cross_entropy(ce.cross_entropy_triton, 33, 1030, 0.02, torch.float32, seed=12, inplace_backward=True)


def test_cross_entropy_triton_leading_dims_and_sum_reduction():
    """(B, T, V) input, loss (B, T), and the stride-0 grad_output that `.sum()` produces."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 97, generator=gen)
    targets = torch.randint(0, 97, (2, 5), generator=gen)
    targets[1, 2:] = IGNORE
    ref_logits = logits.double().requires_grad_()
    ref = _reference_loss(ref_logits.view(-1, 97), targets.view(-1), 0.0).view(2, 5)
    ref.sum().backward()
    x = logits.to(DEVICE).requires_grad_()
    loss = ce.cross_entropy_triton(x, targets.to(DEVICE))
    assert loss.shape == (2, 5)
    loss.sum().backward()
    _close(loss, ref, 1e-5, 1e-5, "loss")
    _close(x.grad, ref_logits.grad, 1e-5, 1e-6, "grad_logits")


def test_cross_entropy_triton_all_ignored():
    logits = torch.randn(9, 300, device=DEVICE).mul(50).requires_grad_()
    targets = torch.full((9,), IGNORE, device=DEVICE)
    loss = ce.cross_entropy_triton(logits, targets, z_loss=0.1)
    loss.sum().backward()
    assert (loss == 0).all() and (logits.grad == 0).all()


def _fused_inputs(n_tokens, vocab, hidden_size, vocab_size, gen):
    """hidden, weight and targets; weight rows past `vocab_size` (padding) all equal, with logits
    about 3 above the real rows' (h . w) spread, so unmasked they would take much of the mass."""
    hidden = torch.randn(n_tokens, hidden_size, generator=gen)
    weight = 0.5 * torch.randn(vocab, hidden_size, generator=gen)
    if vocab_size is not None:
        weight[vocab_size:] = hidden.mean(0) * 3 / hidden.mean(0).norm() ** 2
    return hidden, weight, _targets(n_tokens, vocab_size or vocab, gen)


def _check_fused(fn, n_tokens, vocab, z_loss, dtype, seed, chunk_size, hidden_size=16, tol=None, vocab_size=None):
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, targets = _fused_inputs(n_tokens, vocab, hidden_size, vocab_size, gen)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    grad_out = torch.randn(n_tokens, generator=gen)
    ref_hidden, ref_weight = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = _reference_loss(ref_hidden @ ref_weight.t(), targets, z_loss, vocab_size)
    (ref * grad_out.double()).sum().backward()

    h = hidden.to(DEVICE).requires_grad_()
    w = weight.to(DEVICE).requires_grad_()
    loss = fn(h, w, targets.to(DEVICE), z_loss=z_loss, vocab_size=vocab_size, chunk_size=chunk_size)
    (loss * grad_out.to(DEVICE)).sum().backward()
    loss_tol, grad_rtol, grad_atol = tol or (1e-5, 1e-5, 1e-5)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    _close(loss, ref, loss_tol, loss_tol, "loss")
    _close(h.grad, ref_hidden.grad, grad_rtol, grad_atol, "grad_hidden")
    _close(w.grad, ref_weight.grad, grad_rtol, grad_atol, "grad_weight")
    assert (w.grad[vocab_size or vocab:] == 0).all(), "padding rows must get exactly zero gradient"


FUSED = [ce.fused_linear_cross_entropy_torch, ce.fused_linear_cross_entropy_triton]


@pytest.mark.parametrize("z_loss", [0.0, 0.02])
@pytest.mark.parametrize("n_tokens,vocab", SHAPES)
@pytest.mark.parametrize("fn", FUSED, ids=lambda f: f.__name__)
def test_fused_linear_cross_entropy(fn, n_tokens, vocab, z_loss):
    _check_fused(fn, n_tokens, vocab, z_loss, torch.float32, seed=n_tokens + vocab, chunk_size=8)


@pytest.mark.parametrize("n_tokens,vocab,vocab_size", PADDED)
@pytest.mark.parametrize("fn", FUSED, ids=lambda f: f.__name__)
def test_fused_linear_cross_entropy_ignores_vocabulary_padding(fn, n_tokens, vocab, vocab_size):
    _check_fused(fn, n_tokens, vocab, 0.02, torch.float32, seed=vocab_size, chunk_size=8, vocab_size=vocab_size)


@pytest.mark.parametrize("fn", FUSED, ids=lambda f: f.__name__)
def test_fused_linear_cross_entropy_default_chunk_and_fp16(fn):
    _check_fused(fn, 33, 97, 0.02, torch.float32, seed=21, chunk_size=None)  # one chunk here
    _check_fused(fn, 33, 1030, 0.02, torch.float16, seed=22, chunk_size=8, tol=(1e-2, 1e-2, 1e-2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic needs a GPU (the interpreter has none)")
def test_fused_linear_cross_entropy_triton_bf16_cuda():
    _check_fused(ce.fused_linear_cross_entropy_triton, 257, 50257, 1e-3, torch.bfloat16, seed=23, chunk_size=64,
                 hidden_size=64, tol=(2e-2, 2e-2, 2e-2))


def test_fused_linear_cross_entropy_grad_of_one_input():
    """Only grad_weight wanted (hidden frozen) and only grad_hidden wanted (weight frozen)."""
    gen = torch.Generator().manual_seed(31)
    hidden, weight = torch.randn(7, 16, generator=gen), torch.randn(97, 16, generator=gen)
    targets = torch.randint(0, 97, (7,), generator=gen)
    full_h, full_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ce.fused_linear_cross_entropy_triton(full_h, full_w, targets, chunk_size=3).sum().backward()
    w = weight.clone().requires_grad_()
    ce.fused_linear_cross_entropy_triton(hidden, w, targets, chunk_size=3).sum().backward()
    h = hidden.clone().requires_grad_()
    ce.fused_linear_cross_entropy_triton(h, weight, targets, chunk_size=3).sum().backward()
    torch.testing.assert_close(w.grad, full_w.grad)
    torch.testing.assert_close(h.grad, full_h.grad)


# ---------------------------------------------------------------------------------------------
# vocab-parallel, TP=2 on gloo: each rank checks its shard against the float64 unsharded result
# ---------------------------------------------------------------------------------------------

TP_CHECKS = [
    "cross_entropy_torch", "cross_entropy_triton",
    "fused_linear_cross_entropy_torch", "fused_linear_cross_entropy_triton",
    "megatron_vocab_parallel_cross_entropy",
]


# (z_loss, real vocab) over a padded vocab of 1030, 515 ids per rank: no padding; padding on the
# second rank only; the second rank all padding
TP_CASES = [(0.0, None), (0.02, None), (0.02, 900), (0.0, 400)]


def _real_here(vocab: int, vocab_size: int | None, rank: int, v_local: int) -> int:
    """How many of rank's vocab shard columns are real ids; the rest must get exactly 0 gradient."""
    return max(0, (vocab_size or vocab) - rank * v_local)


def _tp_cross_entropy(fn, rank, world_size, group):
    n_tokens, vocab = 33, 1030
    v_local = vocab // world_size
    for z_loss, vocab_size in TP_CASES:
        gen = torch.Generator().manual_seed(100 + int(z_loss * 100))  # same full problem on every rank
        logits = _padded_logits(n_tokens, vocab, vocab_size, gen)
        targets = _targets(n_tokens, vocab_size or vocab, gen)
        grad_out = torch.randn(n_tokens, generator=gen)
        ref_logits = logits.double().requires_grad_()
        ref = _reference_loss(ref_logits, targets, z_loss, vocab_size)
        (ref * grad_out.double()).sum().backward()
        shard = logits[:, rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
        loss = fn(shard, targets, z_loss=z_loss, tp_group=group, vocab_size=vocab_size)
        (loss * grad_out).sum().backward()
        case = f"z={z_loss} vocab_size={vocab_size}"
        _close(loss, ref, 1e-5, 1e-5, f"loss {case}")
        _close(shard.grad, ref_logits.grad[:, rank * v_local:(rank + 1) * v_local], 1e-5, 1e-6,
               f"grad of vocab shard {rank} {case}")
        assert (shard.grad[:, _real_here(vocab, vocab_size, rank, v_local):] == 0).all(), f"padding grad {case}"


def _tp_fused(fn, rank, world_size, group):
    n_tokens, vocab, hidden_size, z_loss = 33, 1030, 16, 0.02
    v_local = vocab // world_size
    for vocab_size in (None, 900, 400):
        gen = torch.Generator().manual_seed(200)
        hidden, weight, targets = _fused_inputs(n_tokens, vocab, hidden_size, vocab_size, gen)
        grad_out = torch.randn(n_tokens, generator=gen)
        ref_hidden, ref_weight = hidden.double().requires_grad_(), weight.double().requires_grad_()
        ref = _reference_loss(ref_hidden @ ref_weight.t(), targets, z_loss, vocab_size)
        (ref * grad_out.double()).sum().backward()
        h = hidden.clone().requires_grad_()
        w = weight[rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
        loss = fn(h, w, targets, z_loss=z_loss, tp_group=group, vocab_size=vocab_size, chunk_size=8)
        (loss * grad_out).sum().backward()
        _close(loss, ref, 1e-5, 1e-5, f"loss vocab_size={vocab_size}")
        _close(h.grad, ref_hidden.grad, 1e-5, 1e-5, f"grad_hidden (all-reduced) vocab_size={vocab_size}")
        _close(w.grad, ref_weight.grad[rank * v_local:(rank + 1) * v_local], 1e-5, 1e-5,
               f"grad of weight shard {rank} vocab_size={vocab_size}")
        assert (w.grad[_real_here(vocab, vocab_size, rank, v_local):] == 0).all(), f"padding grad {vocab_size}"


def _tp_megatron(rank, world_size, group):
    """megatron-core's vocab_parallel_cross_entropy (no ignore index, no z-loss) on the same shards."""
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state, tensor_parallel
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    except Exception as exc:  # noqa: BLE001
        return f"skip: megatron-core parallel_state did not initialize on CPU/gloo ({type(exc).__name__}: {exc})"
    try:
        seq, batch, vocab = 11, 3, 1030
        v_local = vocab // world_size
        gen = torch.Generator().manual_seed(300)
        logits = 3 * torch.randn(seq, batch, vocab, generator=gen)
        targets = torch.randint(0, vocab, (seq, batch), generator=gen)
        grad_out = torch.randn(seq, batch, generator=gen)
        ref_logits = logits.double().requires_grad_()
        ref = _reference_loss(ref_logits.view(-1, vocab), targets.view(-1), 0.0).view(seq, batch)
        (ref * grad_out.double()).sum().backward()
        ref_grad = ref_logits.grad[..., rank * v_local:(rank + 1) * v_local]
        shard = logits[..., rank * v_local:(rank + 1) * v_local]
        theirs_x = shard.clone().requires_grad_()
        theirs = tensor_parallel.vocab_parallel_cross_entropy(theirs_x.clone(), targets)  # it edits its input
        (theirs * grad_out).sum().backward()
        ours_x = shard.clone().requires_grad_()
        ours = ce.cross_entropy_triton(ours_x, targets, tp_group=parallel_state.get_tensor_model_parallel_group())
        (ours * grad_out).sum().backward()
        _close(theirs, ref, 1e-5, 1e-5, "megatron loss vs float64")
        _close(theirs_x.grad, ref_grad, 1e-5, 1e-6, "megatron grad vs float64")
        _close(ours, theirs, 1e-5, 1e-5, "our loss vs megatron")
        _close(ours_x.grad, theirs_x.grad, 1e-5, 1e-6, "our grad vs megatron")
    finally:
        parallel_state.destroy_model_parallel()
    return None


def _tp2_rank_checks(rank: int, world_size: int) -> dict:
    """Runs in a spawned rank process: every TP check, each outcome None (pass), 'skip: ...' or a traceback."""
    torch.set_num_threads(1)
    ce._alloc = _nan_alloc  # this process is ours: poison and small blocks as in the fixture
    ce._MAX_BLOCK_V = 256
    group = dist.new_group(ranks=list(range(world_size)))
    outcomes = {}
    checks = {
        "cross_entropy_torch": lambda: _tp_cross_entropy(ce.cross_entropy_torch, rank, world_size, group),
        "cross_entropy_triton": lambda: _tp_cross_entropy(ce.cross_entropy_triton, rank, world_size, group),
        "fused_linear_cross_entropy_torch":
            lambda: _tp_fused(ce.fused_linear_cross_entropy_torch, rank, world_size, group),
        "fused_linear_cross_entropy_triton":
            lambda: _tp_fused(ce.fused_linear_cross_entropy_triton, rank, world_size, group),
        "megatron_vocab_parallel_cross_entropy": lambda: _tp_megatron(rank, world_size, group),
    }
    for name in TP_CHECKS:  # same order on every rank: the collectives must match
        try:
            outcomes[name] = checks[name]()
        except AssertionError:
            outcomes[name] = traceback.format_exc()
    return outcomes


@pytest.fixture(scope="module")
def tp2_outcomes():
    return run_distributed(_tp2_rank_checks, world_size=2, backend="gloo", timeout_s=120)


@pytest.mark.parametrize("check", TP_CHECKS)
def test_vocab_parallel_tp2_matches_unsharded(tp2_outcomes, check):
    for rank, outcomes in enumerate(tp2_outcomes):
        outcome = outcomes[check]
        if isinstance(outcome, str) and outcome.startswith("skip:"):
            pytest.skip(outcome)
        assert outcome is None, f"rank {rank}, {check}:\n{outcome}"
