"""CuTe-DSL kernels of msa-cute. Each module is imported only where the DSL is needed (build hosts) or through
``msa.cute.jit`` (GPU nodes load prebuilt modules without importing these files' DSL code paths).

Every ``*.py`` here is part of the source key of every msa-cute kernel (``msa.cute.jit.kernel_sources_digest``).
"""
