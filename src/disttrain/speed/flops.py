"""Achieved FLOP/s and MFU from one counted step.

The FLOPs of one optimizer step are counted once, by `torch.utils.flop_counter.FlopCounterMode`
around it (matrix products, convolutions and attention of forward and backward, padding included;
element-wise work and the optimizer are not counted, as in the usual MFU convention). The run then
reports FLOPs per sample times samples per second. MFU divides that by the devices' dense bf16 peak,
where the device is in the table; a CPU has no such figure, so only FLOP/s are reported there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets, by a
# fragment of torch.cuda.get_device_name(); more specific fragments first (the first match wins).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16: V100 has no bf16 units
}


def device_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where it is not known (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


class FlopCount:
    total: int = 0


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCount]:
    """FLOPs of the operations run inside the block, in `.total` after it."""
    from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

    class TotalOnly(FlopCounterMode):
        # FlopCounterMode also attributes FLOPs to modules, with autograd hooks on their outputs that
        # make torch.autograd.grad inside the step fail ("A leaf node was passed to
        # _will_engine_execute_node"): the GAN's R1 penalty takes one. Only the total is needed.
        def __enter__(self) -> FlopCounterMode:
            self.flop_counts.clear()
            self.mode = _FlopCounterMode(self)
            self.mode.__enter__()
            return self

        def __exit__(self, *args: object) -> None:
            self.mode.__exit__(*args)
            self.mode = None

    count = FlopCount()
    with TotalOnly(display=False) as counter:
        yield count
    count.total = int(counter.get_total_flops())
