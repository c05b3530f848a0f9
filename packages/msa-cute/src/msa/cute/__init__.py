"""msa-cute: sparse prefill / decode attention, FP4 indexer, quantisation helpers (CuTe-DSL kernels + references).

Public names are imported lazily: ``import msa.cute`` loads neither the CuTe DSL nor CUDA.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "build_k2q_csr": "msa.cute.csr",
    "K2qSchedule": "msa.cute.csr",
    "sparse_atten_func": "msa.cute.sparse_prefill",
    "sparse_decode_atten_func": "msa.cute.decode",
    "SparseDecodePagedAttentionWrapper": "msa.cute.decode",
    "fp4_indexer_block_scores": "msa.cute.indexer",
}
_SUBMODULES = ("quant", "reference", "csr", "sparse_prefill", "qouter", "decode", "indexer", "variants", "runtime")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"msa.cute.{name}")
    raise AttributeError(f"module 'msa.cute' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
