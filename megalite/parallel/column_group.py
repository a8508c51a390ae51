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
(launch.sh sets it). The group runs as one GEMM, the weights concatenated along the
output features (Megatron's fused QKV and gate/up), while the parameters stay those of
each layer: every layer's weight is split over the ranks by its own output features,
so each rank's slice is right under grouped-query attention by construction (whole
query heads and whole key/value heads per rank), and names, checkpoints and the
Hugging Face export and import are unchanged (no fused tensor to split or join).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalite.parallel import comm


class _ColumnGroup(torch.autograd.Function):
    """One GEMM for the whole group (the weights concatenated along the output features,
    a copy of the weights only), its output split into the layers' outputs."""

    @staticmethod
    def forward(ctx, x, group, sequence_parallel, *params):
        weights, biases = params[0::2], params[1::2]
        full = comm.all_gather(x, group, dim=1) if sequence_parallel else x
        ctx.save_for_backward(x, *weights)  # under tp_sp: the local shard only
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        ctx.has_bias = biases[0] is not None
        ctx.sizes = [w.shape[0] for w in weights]
        bias = torch.cat(biases) if ctx.has_bias else None
        return F.linear(full, torch.cat(weights), bias).split(ctx.sizes, dim=-1)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        group, sp = ctx.group, ctx.sequence_parallel
        gathering = comm.all_gather_start(x, group, dim=1) if sp else None
        grad = torch.cat(grads, dim=-1)
        grad_full = grad.matmul(torch.cat(weights))  # needs no input
        reducing = comm.reduce_start(grad_full, group, 1 if sp else None)
        full = gathering.wait() if sp else x
        flat_grad = grad.reshape(-1, grad.shape[-1])  # overlaps the reduction:
        grad_w = flat_grad.t().matmul(full.reshape(-1, full.shape[-1])).split(ctx.sizes)
        grad_b = flat_grad.sum(0).split(ctx.sizes) if ctx.has_bias else [None] * len(grad_w)
        params = [t for pair in zip(grad_w, grad_b) for t in pair]
        return (reducing.wait(), None, None, *params)


def project(x: torch.Tensor, layers, group, sequence_parallel: bool) -> tuple:
    """Every column-parallel layer of `layers` applied to `x`, with one input mapping and
    one GEMM (the layers all have a bias, or none has)."""
    params = [t for layer in layers for t in (layer.weight, layer.bias)]
    return _ColumnGroup.apply(x, group, sequence_parallel, *params)
