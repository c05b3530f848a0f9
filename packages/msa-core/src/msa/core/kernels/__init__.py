"""CUDA kernels of msa-core (built by msa.core.jit through msa-cache). Importing this package compiles nothing."""
