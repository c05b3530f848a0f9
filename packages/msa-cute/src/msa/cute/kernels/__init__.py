"""msa-cute kernels. ``dsl/`` holds the CuTe-DSL sources (compiled on build hosts, keyed by their bytes); the modules
here are DSL-free: dispatch (``sparse_prefill_sm90``: ``available`` / ``supports`` / ``run``), warmup specs
(``specs``) and benchmarks. A GPU node imports these and loads prebuilt modules through ``msa.cute.jit``.
"""
