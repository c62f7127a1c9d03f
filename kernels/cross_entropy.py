"""Per-token cross-entropy (ignore index, z-loss, vocab-parallel): PyTorch reference and Triton kernels,
plus the chunked fused linear + cross-entropy that never holds the full (N, V) logits.

Conventions shared by every function here:
- `logits` (..., V_local) and `targets` (...) -> per-token loss `targets.shape`, fp32, 0 where
  `targets == ignore_index`. Math in fp32 whatever the logits' dtype; gradients come back in the
  input's dtype.
- `z_loss` adds z_loss * lse^2 (PaLM), lse = logsumexp over the full vocab; its gradient is
  2 * z_loss * lse * softmax.
- `tp_group` (a torch.distributed ProcessGroup) makes the op vocab-parallel: the last dim of
  `logits` (or the rows of `weight`) is this rank's shard, covering vocab ids
  [r * V_local, (r + 1) * V_local) with r the rank within `tp_group` (Megatron's layout). Every rank
  returns the full per-token loss; the backward of the logits needs no communication.
- `vocab_size` is the real vocabulary when the logits are padded past it (Megatron pads the
  embedding to a multiple of 128 x T): columns of ids >= vocab_size -- on a vocab-parallel rank,
  the local columns past vocab_size - r * V_local -- are left out of the log-sum-exp, as if their
  logits were -inf, and get a gradient of exactly 0. Targets must be real ids. None: no padding.

Memory of the fused linear + cross-entropy (`fused_linear_cross_entropy_*`): the forward keeps only
`hidden`, `weight`, `targets` and one fp32 log-sum-exp per token; at any time it holds one chunk of
logits (chunk_size x V_local, in the compute dtype). Because the loss is per token and the incoming
gradient may weight each token differently, grad_weight = sum_i g_i * dlogits_i^T h_i cannot be
formed before backward, so the backward recomputes each chunk's logits (one extra matmul: 4 instead
of 3 N*V*H matmuls), turns them into grad_logits in place and folds them into grad_hidden (N, H)
and an fp32 grad_weight accumulator (V_local, H). Peak extra memory is therefore
O(chunk_size * V_local + V_local * H) instead of O(N * V_local) logits and gradients. Each chunk
reads the whole weight 4 times (forward, recompute, grad_hidden, grad_weight), so chunks are as
large as a memory budget allows: `LOGITS_CHUNK_BYTES` of logits (4096 tokens at a 128K vocabulary
in bf16), not a fraction of the tokens.

Mixed precision: the compute dtype is fixed in the forward -- the autocast dtype when the forward
runs under autocast (the trainer's bf16 with fp32 parameters), else hidden's dtype -- and the
backward, which autograd runs outside any autocast region, recomputes the logits and runs its
matmuls in that same dtype (what `torch.amp.custom_fwd`/`custom_bwd` do, for whichever device the
tensors are on): the log-sum-exp saved from bf16 logits is applied to the same bf16 logits, and
every matmul runs on the 16-bit tensor cores. The weight is cast once per pass, not per chunk. The
weight gradient accumulates in fp32 over chunks (on CUDA by one `addmm(..., out_dtype=float32)`
per chunk where torch supports it, else each chunk's 16-bit product is added to the fp32 sum).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux x86-64 only
    triton = None
    tl = None

__all__ = [
    "IGNORE_INDEX",
    "cross_entropy_torch",
    "cross_entropy_triton",
    "fused_linear_cross_entropy_torch",
    "fused_linear_cross_entropy_triton",
]

IGNORE_INDEX = -100

# Vocab block one Triton program reads per step; rows longer than this are streamed block by block.
# Tests lower it to exercise the streaming path on small vocabularies.
_MAX_BLOCK_V = 4096
_NUM_WARPS = 8


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _vocab_start(v_local: int, tp_group) -> int:
    return 0 if tp_group is None else dist.get_rank(tp_group) * v_local


def _real_columns(v_local: int, tp_group, vocab_size: int | None) -> int:
    """How many of this shard's columns are real ids (the rest is vocabulary padding; a
    vocab-parallel rank may hold padding only)."""
    full = v_local * (1 if tp_group is None else dist.get_world_size(tp_group))
    if vocab_size is None:
        return v_local
    if not 0 < vocab_size <= full:
        raise ValueError(f"vocab_size={vocab_size} must be in 1..{full}, the width of the (padded) logits")
    return max(0, min(v_local, vocab_size - _vocab_start(v_local, tp_group)))


def _finish_loss(lse: torch.Tensor, target_logit: torch.Tensor, targets: torch.Tensor,
                 ignore_index: int, z_loss: float) -> torch.Tensor:
    loss = lse - target_logit
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(targets != ignore_index, loss, torch.zeros_like(loss))


def _reduce_row_stats(row_max: torch.Tensor, sumexp: torch.Tensor, target_logit: torch.Tensor,
                      tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (max, sum exp(x - max), target logit) of each shard -> global (lse, target logit).
    Two collectives: MAX of the maxima, then one SUM of the rescaled sum-exps and target logits."""
    if tp_group is None:
        return row_max + torch.log(sumexp), target_logit
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    packed = torch.stack([sumexp * torch.exp(row_max - global_max), target_logit])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
    return global_max + torch.log(packed[0]), packed[1]


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------

def _local_target(targets: torch.Tensor, vocab_start: int, v_local: int, ignore_index: int):
    """(index into this shard, clamped to 0 where absent; mask: the target lies in this shard)."""
    local = targets - vocab_start
    in_shard = (targets != ignore_index) & (local >= 0) & (local < v_local)
    return torch.where(in_shard, local, torch.zeros_like(local)), in_shard


def _real_logits(logits: torch.Tensor, n_real: int) -> torch.Tensor:
    """The logits in fp32 with padding columns (from `n_real` on) at -inf; a new tensor when padded."""
    pad = logits.shape[-1] - n_real
    return F.pad(logits[..., :n_real].float(), (0, pad), value=float("-inf")) if pad else logits.float()


def _grad_logits_torch(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       grad_out: torch.Tensor, vocab_start: int, n_real: int, ignore_index: int, z_loss: float,
                       out: torch.Tensor) -> torch.Tensor:
    """out = (softmax * (1 + 2 z lse) - onehot) * grad_out row-wise, 0 on ignored rows and padding
    columns (may alias logits)."""
    x = _real_logits(logits, n_real)
    local, in_shard = _local_target(targets, vocab_start, x.shape[-1], ignore_index)
    valid = targets != ignore_index
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    grad = torch.exp(x - lse.unsqueeze(-1)) * (1.0 + 2.0 * z_loss * lse).unsqueeze(-1)
    grad.scatter_add_(-1, local.unsqueeze(-1), -in_shard.to(grad.dtype).unsqueeze(-1))
    grad = grad * torch.where(valid, grad_out.float(), torch.zeros_like(lse)).unsqueeze(-1)
    return out.copy_(grad)


def _row_stats_torch(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, n_real: int,
                     ignore_index: int, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    x = _real_logits(logits, n_real)
    row_max = x.amax(-1)  # -inf on a shard of padding only: its sum-exp is 0
    local, in_shard = _local_target(targets, vocab_start, x.shape[-1], ignore_index)
    out[0].copy_(row_max)
    out[1].copy_(torch.exp(x - row_max.nan_to_num(neginf=0.0).unsqueeze(-1)).sum(-1))
    out[2].copy_(torch.where(in_shard, x.gather(-1, local.unsqueeze(-1)).squeeze(-1), torch.zeros_like(row_max)))


class _CrossEntropyTorch(torch.autograd.Function):
    """Single-rank reference: one fused log-softmax pass forward (fp32, saved); the backward turns
    those log-probabilities into the gradient in place, so no further (N, V) buffer is allocated.
    About 2x faster than F.cross_entropy's backward on CPU, 4x faster than autograd through
    logsumexp + gather. A second backward (retain_graph) fails the saved-tensor version check."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, z_loss, n_real):
        logp = torch.log_softmax(_real_logits(logits, n_real), dim=-1)  # (N, V), -inf on padding
        valid = targets != ignore_index
        index = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(-1)  # (N, 1)
        loss = -logp.gather(-1, index).squeeze(-1)
        lse = None
        if z_loss:
            lse = logits.gather(-1, index).squeeze(-1).float() + loss  # x_t - log p_t
            loss = loss + z_loss * lse * lse
        ctx.save_for_backward(logp, index, valid, lse)
        ctx.z_loss, ctx.logits_dtype = z_loss, logits.dtype
        return torch.where(valid, loss, torch.zeros_like(loss))

    @staticmethod
    def backward(ctx, grad_loss):
        logp, index, valid, lse = ctx.saved_tensors
        g = torch.where(valid, grad_loss.float(), torch.zeros_like(grad_loss, dtype=torch.float32))
        scale = g if lse is None else g * (1.0 + 2.0 * ctx.z_loss * lse)
        grad = logp.exp_().mul_(scale.unsqueeze(-1))  # softmax * scale, in the saved buffer
        grad.scatter_add_(-1, index, -g.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


class _VocabParallelCrossEntropyTorch(torch.autograd.Function):
    """Reference vocab-parallel loss: global max first, then sum-exp and target logit, all in fp32."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, z_loss, tp_group, n_real):
        x = _real_logits(logits, n_real)
        v_local = x.shape[-1]
        vocab_start = _vocab_start(v_local, tp_group)
        row_max = x.amax(-1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)  # finite: some rank holds real ids
        sumexp = torch.exp(x - row_max.unsqueeze(-1)).sum(-1)
        dist.all_reduce(sumexp, op=dist.ReduceOp.SUM, group=tp_group)
        local, in_shard = _local_target(targets, vocab_start, v_local, ignore_index)
        target_logit = torch.where(in_shard, x.gather(-1, local.unsqueeze(-1)).squeeze(-1), torch.zeros_like(row_max))
        dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=tp_group)
        lse = row_max + torch.log(sumexp)
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab_start, ctx.n_real, ctx.ignore_index, ctx.z_loss = vocab_start, n_real, ignore_index, z_loss
        return _finish_loss(lse, target_logit, targets, ignore_index, z_loss)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        _grad_logits_torch(logits, targets, lse, grad_loss, ctx.vocab_start, ctx.n_real, ctx.ignore_index,
                           ctx.z_loss, grad)
        return grad, None, None, None, None, None


def cross_entropy_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                        z_loss: float = 0.0, tp_group=None, vocab_size: int | None = None) -> torch.Tensor:
    """logits (..., V), targets (...) -> loss (...) in fp32; 0 where targets == ignore_index.
    z_loss adds z_loss * logsumexp(logits)^2 (PaLM) to keep the softmax normalizer near 1.
    With `tp_group`, logits is this rank's vocab shard; with `vocab_size`, columns past it are
    padding (see the module docstring)."""
    v_local = logits.shape[-1]
    n_real = _real_columns(v_local, tp_group, vocab_size)
    if tp_group is not None:
        loss = _VocabParallelCrossEntropyTorch.apply(logits.reshape(-1, v_local), targets.reshape(-1),
                                                     ignore_index, z_loss, tp_group, n_real)
        return loss.view(targets.shape)
    loss = _CrossEntropyTorch.apply(logits.reshape(-1, v_local), targets.reshape(-1), ignore_index, z_loss, n_real)
    return loss.view(targets.shape)


# ----------------------------------------------------------------------------------------------
# Triton kernels: one program per row, streaming over vocab blocks (the softmax is never stored)
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _cross_entropy_fwd_kernel(
        logits_ptr, logits_row_stride, targets_ptr,
        loss_ptr, lse_ptr,                       # FINISH: per-row loss and log-sum-exp
        max_ptr, sumexp_ptr, target_logit_ptr,   # not FINISH: per-row shard statistics
        n_cols, n_real, vocab_start, ignore_index, z_loss,
        FINISH: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Columns from `n_real` on are vocabulary padding: never read, left out of the sum-exp."""
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(targets_ptr + row).to(tl.int64)
        if target == ignore_index:
            if FINISH:
                tl.store(loss_ptr + row, 0.0)
                tl.store(lse_ptr + row, 0.0)
            else:  # neutral statistics: max 0, sum-exp 1, target logit 0
                tl.store(max_ptr + row, 0.0)
                tl.store(sumexp_ptr + row, 1.0)
                tl.store(target_logit_ptr + row, 0.0)
            return
        row_ptr = logits_ptr + row * logits_row_stride
        # online max / sum-exp: when the running max grows, rescale the running sum
        row_max = float("-inf")
        sumexp = 0.0
        for start in range(0, n_real, BLOCK_V):  # a shard of padding only keeps max -inf, sum-exp 0
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < n_real, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=0))
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)  # a block of -inf logits stays finite
            sumexp = sumexp * tl.exp(row_max - ref) + tl.sum(tl.exp(x - ref), axis=0)
            row_max = new_max
        local = target - vocab_start
        in_shard = (local >= 0) & (local < n_cols)
        target_logit = tl.load(row_ptr + tl.where(in_shard, local, 0), mask=in_shard, other=0.0).to(tl.float32)
        target_logit = tl.where(in_shard, target_logit, 0.0)
        if FINISH:
            lse = row_max + tl.log(sumexp)
            tl.store(loss_ptr + row, lse - target_logit + z_loss * lse * lse)
            tl.store(lse_ptr + row, lse)
        else:
            tl.store(max_ptr + row, row_max)
            tl.store(sumexp_ptr + row, sumexp)
            tl.store(target_logit_ptr + row, target_logit)

    @triton.jit
    def _cross_entropy_bwd_kernel(
        logits_ptr, logits_row_stride, grad_ptr, grad_row_stride,
        targets_ptr, lse_ptr, grad_out_ptr, grad_out_stride,
        n_cols, n_real, vocab_start, ignore_index, z_loss,
        BLOCK_V: tl.constexpr,
    ):
        """grad = (softmax * (1 + 2 z lse) - onehot) * grad_out, 0 on padding columns (from
        `n_real` on); grad_ptr may equal logits_ptr."""
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(targets_ptr + row).to(tl.int64)
        grad_row_ptr = grad_ptr + row * grad_row_stride
        if target == ignore_index:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(grad_row_ptr + cols, tl.zeros((BLOCK_V,), dtype=grad_ptr.dtype.element_ty),
                         mask=cols < n_cols)
            return
        row_ptr = logits_ptr + row * logits_row_stride
        lse = tl.load(lse_ptr + row)
        grad_out = tl.load(grad_out_ptr + row * grad_out_stride).to(tl.float32)
        scale = grad_out * (1.0 + 2.0 * z_loss * lse)
        local = target - vocab_start
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=cols < n_real, other=float("-inf")).to(tl.float32)
            grad = tl.exp(x - lse) * scale - tl.where(cols == local, grad_out, 0.0)
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _block_v(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), _MAX_BLOCK_V)


def _check_triton() -> None:
    if triton is None:
        raise RuntimeError("cross_entropy_triton needs the `triton` package (Linux x86-64)")


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (N, V) with unit stride along the vocab."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _forward_triton(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, n_real: int, ignore_index: int,
                    z_loss: float, finish: bool, out: tuple[torch.Tensor, ...]) -> None:
    """finish: out = (loss, lse). Else out = (max, sumexp, target_logit) of this shard."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    if finish:
        loss, lse = out
        row_max = sumexp = target_logit = loss  # unused pointers
    else:
        row_max, sumexp, target_logit = out
        loss = lse = row_max
    _cross_entropy_fwd_kernel[(n_rows,)](
        logits, logits.stride(0), targets, loss, lse, row_max, sumexp, target_logit,
        n_cols, n_real, vocab_start, ignore_index, float(z_loss),
        FINISH=finish, BLOCK_V=_block_v(n_cols), num_warps=_NUM_WARPS,
    )


def _row_stats_triton(logits, targets, vocab_start, n_real, ignore_index, out) -> None:
    _forward_triton(logits, targets, vocab_start, n_real, ignore_index, 0.0, False, out)


def _grad_logits_triton(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                        grad_out: torch.Tensor, vocab_start: int, n_real: int, ignore_index: int, z_loss: float,
                        out: torch.Tensor) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return out
    grad_out = grad_out.float()  # keeps a stride-0 (expanded) grad_output as is
    _cross_entropy_bwd_kernel[(n_rows,)](
        logits, logits.stride(0), out, out.stride(0), targets, lse, grad_out, grad_out.stride(0),
        n_cols, n_real, vocab_start, ignore_index, float(z_loss),
        BLOCK_V=_block_v(n_cols), num_warps=_NUM_WARPS,
    )
    return out


class _CrossEntropyTriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, z_loss, tp_group, n_real, inplace_backward):
        n_rows, v_local = logits.shape
        vocab_start = _vocab_start(v_local, tp_group)
        if tp_group is None:
            loss = _alloc((n_rows,), torch.float32, logits.device)
            lse = _alloc((n_rows,), torch.float32, logits.device)
            _forward_triton(logits, targets, 0, n_real, ignore_index, z_loss, True, (loss, lse))
        else:
            stats = tuple(_alloc((n_rows,), torch.float32, logits.device) for _ in range(3))
            _forward_triton(logits, targets, vocab_start, n_real, ignore_index, z_loss, False, stats)
            lse, target_logit = _reduce_row_stats(*stats, tp_group)
            loss = _finish_loss(lse, target_logit, targets, ignore_index, z_loss)
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab_start, ctx.n_real, ctx.ignore_index, ctx.z_loss = vocab_start, n_real, ignore_index, z_loss
        ctx.inplace_backward = inplace_backward
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = logits if ctx.inplace_backward else _alloc(logits.shape, logits.dtype, logits.device)
        _grad_logits_triton(logits, targets, lse, grad_loss, ctx.vocab_start, ctx.n_real, ctx.ignore_index,
                            ctx.z_loss, grad)
        return grad, None, None, None, None, None, None


def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         z_loss: float = 0.0, tp_group=None, vocab_size: int | None = None,
                         inplace_backward: bool = False) -> torch.Tensor:
    """Same contract as `cross_entropy_torch`, with Triton kernels: the forward streams each row once
    (online max / sum-exp and the target logit), the backward writes the gradient in one pass.
    Saved for backward: the logits and one fp32 log-sum-exp per token.
    inplace_backward=True writes grad_logits into the logits' storage (saves N x V memory): only
    when nothing else reads those logits after the loss, and the graph is backpropagated once."""
    _check_triton()
    n_real = _real_columns(logits.shape[-1], tp_group, vocab_size)
    loss = _CrossEntropyTriton.apply(_as_rows(logits), targets.reshape(-1).contiguous(), ignore_index, z_loss,
                                     tp_group, n_real, inplace_backward)
    return loss.view(targets.shape)


# ----------------------------------------------------------------------------------------------
# Fused linear + cross-entropy, chunked over tokens
# ----------------------------------------------------------------------------------------------

class _CrossEntropyBackend(NamedTuple):
    row_stats: Callable   # (logits, targets, vocab_start, n_real, ignore_index, out=(max, sumexp, target_logit))
    grad_logits: Callable  # (logits, targets, lse, grad_out, vocab_start, n_real, ignore_index, z_loss, out)


_TORCH_BACKEND = _CrossEntropyBackend(_row_stats_torch, _grad_logits_torch)
_TRITON_BACKEND = _CrossEntropyBackend(_row_stats_triton, _grad_logits_triton)


LOGITS_CHUNK_BYTES = 1 << 30
"""Memory budget of one chunk of logits in the fused linear + cross-entropy (default chunk size)."""


def _default_chunk_size(n_tokens: int, v_local: int, compute_dtype: torch.dtype) -> int:
    """As many tokens as fit LOGITS_CHUNK_BYTES of (tokens, V_local) logits in the compute dtype."""
    per_token = v_local * torch.empty((), dtype=compute_dtype).element_size()
    return max(1, min(n_tokens, LOGITS_CHUNK_BYTES // per_token))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The autocast dtype inside an autocast region of hidden's device, else hidden's dtype."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


_MIXED_ADDMM = {"cuda": True}
"""Device types whose addmm takes 16-bit inputs into an fp32 sum (`out_dtype`); cleared on the
first refusal (older torch builds require the sum in the inputs' dtype)."""


def _accumulate_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: list) -> None:
    """total += a @ b, `total` fp32 whatever a and b are: one fp32 addmm, one mixed-dtype addmm
    where the device has it, else the 16-bit product in `scratch[0]` (allocated once) added to it."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
        return
    device_type = total.device.type
    if _MIXED_ADDMM.get(device_type):
        try:
            torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
            return
        except RuntimeError:
            _MIXED_ADDMM[device_type] = False
    if not scratch:
        scratch.append(_alloc(total.shape, a.dtype, total.device))
    total.add_(torch.mm(a, b, out=scratch[0]))


class _FusedLinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, z_loss, tp_group, n_real, chunk_size, backend,
                compute_dtype):
        n_tokens = hidden.shape[0]
        v_local = weight.shape[0]
        vocab_start = _vocab_start(v_local, tp_group)
        stats = tuple(_alloc((n_tokens,), torch.float32, hidden.device) for _ in range(3))
        hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            logits = torch.mm(hidden_c[start:end], weight_c.t())  # (C, V_local), the only logits alive
            backend.row_stats(logits, targets[start:end], vocab_start, n_real, ignore_index,
                              tuple(s[start:end] for s in stats))
            del logits
        lse, target_logit = _reduce_row_stats(*stats, tp_group)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.vocab_start, ctx.n_real, ctx.ignore_index, ctx.z_loss = vocab_start, n_real, ignore_index, z_loss
        ctx.tp_group, ctx.chunk_size, ctx.backend, ctx.compute_dtype = tp_group, chunk_size, backend, compute_dtype
        return _finish_loss(lse, target_logit, targets, ignore_index, z_loss)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tokens = hidden.shape[0]
        hidden_c, weight_c = hidden.to(ctx.compute_dtype), weight.to(ctx.compute_dtype)  # as in the forward
        grad_hidden = _alloc(hidden.shape, hidden.dtype, hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        scratch = []
        for start in range(0, n_tokens, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n_tokens)
            hidden_chunk = hidden_c[start:end]
            logits = torch.mm(hidden_chunk, weight_c.t())
            grad_logits = ctx.backend.grad_logits(logits, targets[start:end], lse[start:end], grad_loss[start:end],
                                                  ctx.vocab_start, ctx.n_real, ctx.ignore_index, ctx.z_loss, logits)
            if need_hidden:
                if grad_hidden.dtype == grad_logits.dtype:
                    torch.mm(grad_logits, weight_c, out=grad_hidden[start:end])
                else:
                    grad_hidden[start:end] = torch.mm(grad_logits, weight_c)
            if need_weight:
                _accumulate_product(grad_weight, grad_logits.t(), hidden_chunk, scratch)
            del logits, grad_logits
        if need_hidden and ctx.tp_group is not None:
            # each rank holds the contribution of its vocab shard (ColumnParallelLinear's backward)
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _fused_linear_cross_entropy(hidden, weight, targets, ignore_index, z_loss, tp_group, vocab_size, chunk_size,
                                backend):
    hidden_size = hidden.shape[-1]
    if weight.shape[-1] != hidden_size:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden_size}")
    rows = hidden.reshape(-1, hidden_size)
    flat_targets = targets.reshape(-1).contiguous()
    if rows.shape[0] != flat_targets.shape[0]:
        raise ValueError(f"{rows.shape[0]} tokens in hidden but {flat_targets.shape[0]} targets")
    compute_dtype = _compute_dtype(rows)
    if chunk_size is None:
        chunk_size = _default_chunk_size(rows.shape[0], weight.shape[0], compute_dtype)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_real = _real_columns(weight.shape[0], tp_group, vocab_size)
    loss = _FusedLinearCrossEntropy.apply(rows, weight, flat_targets, ignore_index, z_loss, tp_group, n_real,
                                          int(chunk_size), backend, compute_dtype)
    return loss.view(targets.shape)


def fused_linear_cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0, tp_group=None,
                                     vocab_size: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Per-token loss of (hidden @ weight.T) without holding the full logits: hidden (..., H),
    weight (V_local, H), targets (...) -> loss (...) fp32. Chunked over `chunk_size` tokens
    (None: LOGITS_CHUNK_BYTES of logits per chunk); see the module docstring for memory and
    mixed precision (under autocast the matmuls run in the autocast dtype, forward and backward).
    With `tp_group`, weight is this rank's vocab shard and hidden is replicated on the group;
    grad_hidden is all-reduced over the group. Rows of `weight` past `vocab_size` are padding
    (zero gradient). Cross-entropy math in PyTorch (reference)."""
    return _fused_linear_cross_entropy(hidden, weight, targets, ignore_index, z_loss, tp_group, vocab_size,
                                       chunk_size, _TORCH_BACKEND)


def fused_linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                      ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0, tp_group=None,
                                      vocab_size: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """`fused_linear_cross_entropy_torch` with the Triton cross-entropy kernels on each chunk; the
    per-chunk statistics of a vocab-parallel run are reduced once for all chunks (2 collectives)."""
    _check_triton()
    return _fused_linear_cross_entropy(hidden, weight, targets, ignore_index, z_loss, tp_group, vocab_size,
                                       chunk_size, _TRITON_BACKEND)
