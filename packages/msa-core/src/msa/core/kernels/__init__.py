"""CUDA kernels of msa-core (built by msa.core.jit through msa-cache). Importing this package compiles nothing.

It registers each kernel with :mod:`msa.core.dispatch`; the availability checks import only light modules.
"""

from __future__ import annotations

import importlib

from msa.core import dispatch

_KERNEL_MODULES = {
    # op name -> (kernel name, module)
    "sparse_topk_select": ("topk_cuda", "msa.core.kernels.topk"),
    "fmha": ("fmha_sm90", "msa.core.kernels.fmha_sm90"),
    "dequantize_kv": ("kv_dequant", "msa.core.kernels.kv_dequant"),  # msa.cute.quant.dequantize_kv
}
# Further kernels of an op, tried after the one above (supports() keeps them disjoint).
_EXTRA_KERNELS = (
    ("fmha", "sparse_decode", "msa.core.kernels.sparse_decode"),  # per-token block-sparse (kv_block_indexes)
)


def _hooks(module: str):
    def available(device):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            return False, f"{module} is not built into this msa-core ({e})"
        return mod.available(device)

    def supports(**features):
        mod = importlib.import_module(module)
        fn = getattr(mod, "supports", None)
        return (True, "ok") if fn is None else fn(**features)

    return available, supports


for _op, (_name, _module) in _KERNEL_MODULES.items():
    dispatch.register_kernel(_op, _name, *_hooks(_module))
for _op, _name, _module in _EXTRA_KERNELS:
    dispatch.register_kernel(_op, _name, *_hooks(_module))
