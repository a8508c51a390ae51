"""Small helpers shared by the Triton kernel modules.

The Triton interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors with numpy,
which lets the tests run without a GPU. It is slow, so every autotuned kernel gets a
single configuration there; on a GPU the full list is tried once per key.
"""

import os

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def configs_for_device(gpu_configs, interpreter_config):
    """The autotune list to use: one fixed config under the interpreter."""
    return [interpreter_config] if interpreting() else gpu_configs


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """`x` as [rows, last_dim] with a unit stride along the last dim.

    Kernels take the row stride, so a slice such as `fused[..., :ffn]` is used in
    place; only a tensor whose last dim is strided, or whose leading dims cannot be
    flattened into one stride, is copied.
    """
    if x.dim() == 0 or x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def persistent_programs(device: torch.device, rows: int) -> int:
    """How many programs a row-loop kernel (norm backward) launches.

    It depends only on the device and the row count, so the partial weight-gradient
    sums, and therefore the gradient bits, are the same on every run.
    """
    if device.type == "cuda":
        slots = torch.cuda.get_device_properties(device).multi_processor_count * 4
    else:
        slots = 4
    return max(1, min(rows, slots))
