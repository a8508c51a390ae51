"""Column-parallel linears that read the same input, with Megatron's collectives: one.

q, k and v (and gate and up) are separate column-parallel layers over one input. Each
with its own input mapping would all-reduce (tp) or all-gather and reduce-scatter
(tp_sp) that input once per layer; `project` maps the input once for all of them:

                   forward                     backward
    tp             nothing                     1 all-reduce of the input gradient
    tp + tp_sp     1 all-gather of the input   1 all-gather (again) + 1 reduce-scatter

Under tp_sp only this rank's sequence shard of the input is saved for backward, as in
Megatron (Korthikanti et al. 2022): backward gathers it again for the weight gradients,
trading one all-gather for a saved activation tp times smaller. Overlap, as Megatron
does it: backward starts the re-gather before it computes the input gradient (which
does not need it), and starts the input gradient's reduction before it computes the
weight gradients (which do not need that); on CUDA the communication kernels are then
queued ahead of the GEMMs they overlap with, which needs CUDA_DEVICE_MAX_CONNECTIONS=1
(launch.sh sets it). The parameters stay those of each layer (names, checkpoints and
Hugging Face export are unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalite.parallel import comm


class _ColumnGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sequence_parallel, *params):
        weights, biases = params[0::2], params[1::2]
        full = comm.all_gather(x, group, dim=1) if sequence_parallel else x
        ctx.save_for_backward(x, *weights)  # under tp_sp: the local shard only
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        ctx.has_bias = [b is not None for b in biases]
        return tuple(F.linear(full, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        group, sp = ctx.group, ctx.sequence_parallel
        gathering = comm.all_gather_start(x, group, dim=1) if sp else None
        grad_full = sum(g.matmul(w) for g, w in zip(grads, weights))  # needs no input
        reducing = comm.reduce_start(grad_full, group, 1 if sp else None)
        full = gathering.wait() if sp else x
        flat_in = full.reshape(-1, full.shape[-1])
        params = []
        for g, has_bias in zip(grads, ctx.has_bias):  # overlaps the reduction
            flat_g = g.reshape(-1, g.shape[-1])
            params += [flat_g.t().matmul(flat_in), flat_g.sum(0) if has_bias else None]
        return (reducing.wait(), None, None, *params)


def project(x: torch.Tensor, layers, group, sequence_parallel: bool) -> tuple:
    """Every column-parallel layer of `layers` applied to `x`, with one input mapping."""
    params = [t for layer in layers for t in (layer.weight, layer.bias)]
    return _ColumnGroup.apply(x, group, sequence_parallel, *params)
