"""The column-parallel linear's autograd function, with Megatron's collectives.

Every column-parallel layer (the fused q/k/v and gate/up projections, c_fc, the LM
head) maps its input once:

                   forward                     backward
    tp             nothing                     1 all-reduce of the input gradient
    tp + tp_sp     1 all-gather of the input   1 all-gather (again) + 1 reduce-scatter

Under tp_sp only this rank's sequence shard of the input is saved for backward, as in
Megatron (Korthikanti et al. 2022): backward gathers it again for the weight gradient,
trading one all-gather for a saved activation tp times smaller. Overlap, as Megatron
does it: backward starts the re-gather before it computes the input gradient (which
does not need it), and starts the input gradient's reduction before it computes the
weight gradient (which does not need that); on CUDA the communication kernels are then
queued ahead of the GEMMs they overlap with, which needs CUDA_DEVICE_MAX_CONNECTIONS=1
(launch.sh sets it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalite.parallel import comm


class _ColumnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group, sequence_parallel):
        full = comm.all_gather(x, group, dim=1) if sequence_parallel else x
        ctx.save_for_backward(x, weight)  # under tp_sp: the local shard only
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        ctx.has_bias = bias is not None
        return F.linear(full, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        group, sp = ctx.group, ctx.sequence_parallel
        gathering = comm.all_gather_start(x, group, dim=1) if sp else None
        reducing = comm.reduce_start(grad.matmul(weight), group, 1 if sp else None)
        full = gathering.wait() if sp else x
        flat_grad = grad.reshape(-1, grad.shape[-1])
        # the weight gradient overlaps the input gradient's reduction
        grad_weight = flat_grad.t().matmul(full.reshape(-1, full.shape[-1]))
        grad_bias = flat_grad.sum(0) if ctx.has_bias else None
        return reducing.wait(), grad_weight, grad_bias, None, None


def column_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group,
                  sequence_parallel: bool) -> torch.Tensor:
    """x [B, S, in] (under tp_sp [B, S/tp, in]) -> [B, S, out/tp]."""
    return _ColumnLinear.apply(x, weight, bias, group, sequence_parallel)
