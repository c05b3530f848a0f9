"""The two ceilings, measured once per run on the device: dense bf16 matmul rate and device-to-device copy rate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .timing import TimerConfig, measure

DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100 SXM; used only when the device does not report it


@dataclass
class Roofline:
    device_name: str
    matmul_tflops: float  # bf16 (fp32 on the CPU dry run)
    copy_gbs: float  # bytes read + bytes written per second / 1e9
    l2_bytes: int
    matmul_shape: int
    copy_bytes: int

    def peak_tflops(self, dtype: str) -> float:
        # Hopper's fp8 tensor-core rate is twice its bf16 rate; we measure bf16 and scale (stated in the README).
        return self.matmul_tflops * (2.0 if dtype in ("fp8", "nvfp4") else 1.0)

    def describe(self) -> str:
        return (f"{self.device_name}: matmul {self.matmul_shape}^3 {self.matmul_tflops:.4g} TFLOP/s, "
                f"copy {self.copy_bytes / 2**30:.2f} GiB {self.copy_gbs:.4g} GB/s (read+write), "
                f"L2 {self.l2_bytes / 2**20:.0f} MiB")


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    for name in ("L2_cache_size", "l2_cache_size"):
        value = getattr(props, name, None)
        if value:
            return int(value)
    return DEFAULT_L2_BYTES


def measure_roofline(device: torch.device, cfg: TimerConfig, dry: bool = False) -> Roofline:
    if device.type == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 2 * 2**30
        name = torch.cuda.get_device_name(device)
    else:
        n, dtype, copy_bytes = (256 if dry else 2048), torch.float32, (16 if dry else 256) * 2**20
        name = "cpu"
    gen = torch.Generator(device=device).manual_seed(7)
    tflops = 2.0 * n**3 / (_time_matmul(n, dtype, device, gen, cfg) * 1e-3) / 1e12
    gbs = 2.0 * copy_bytes / (_time_copy(copy_bytes, device, gen, cfg) * 1e-3) / 1e9
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Roofline(name, tflops, gbs, l2_bytes(device), n, copy_bytes)


def _time_matmul(n: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator, cfg: TimerConfig) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return measure([lambda: torch.mm(a, b, out=c)], device, cfg, graph_ok=False).median_ms


def _time_copy(nbytes: int, device: torch.device, gen: torch.Generator, cfg: TimerConfig) -> float:
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16, generator=gen)
    dst = torch.empty_like(src)
    return measure([lambda: dst.copy_(src)], device, cfg, graph_ok=False).median_ms
