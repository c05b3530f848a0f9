"""CuTe-DSL sources of msa-cute's kernels: everything here is traced by ``cute.compile`` (imports cutlass).

The bytes of every ``*.py`` in this directory are the source ingredient of every msa-cute kernel key
(``msa.cute.jit.kernel_sources_digest``), so only code that reaches the compiler belongs here; dispatch, warmup
specs and benchmarks live one level up.
"""
