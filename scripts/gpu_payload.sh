#!/usr/bin/env bash
# Build everything a GPU host needs on this GPU-less build host, into .gpu/ (git-ignored, carried to the GPU box):
#   .gpu/whl/      wheels the GPU box lacks (apache-tvm-ffi cp312, platformdirs) -- pip install --no-index there
#   .gpu/bundle.tar  an msa-cache bundle: every kernel of the presets compiled for the arch (+ runtime libraries)
#   .gpu/fmha_prebuilt.tgz  (FMHA_PREBUILT=1) every fmha_sm90 module the GPU tests load, for a host without the
#                    CUTLASS headers: tar -xzf it into DIR there and set MSA_FMHA_SM90_PREBUILT=DIR (~30 min, 2 cores)
# This is the product route for offline GPU nodes: warm a store where a compiler is, export it, import it there.
# PRESETS: the GPU tests need the CuTe kernels of both "smoke" (GQA 4) and "minimax-m3" (GQA 16).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESETS=${PRESETS:-${PRESET:-smoke minimax-m3}}
ARCH=${ARCH:-sm_90a}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MSA_CACHE_DIR=${MSA_CACHE_DIR:-$PWD/.gpu/cache-build}
mkdir -p .gpu/whl
TVM_FFI_VERSION=$(python3 -c "import tvm_ffi; print(tvm_ffi.__version__)")
for spec in "apache-tvm-ffi==$TVM_FFI_VERSION" "platformdirs"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .gpu/whl "$spec"
done
for preset in $PRESETS; do
  msa-cache warmup --preset "$preset" --arch "$ARCH" --jobs "${JOBS:-2}"
done
msa-cache bundle -o .gpu/bundle.tar --arch "$ARCH" ${BUNDLE_FLAGS:-}
if [ "${FMHA_PREBUILT:-0}" = 1 ]; then
  python3 benchmarks/bench_fmha.py --prebuild .gpu/fmha_prebuilt
  tar -czf .gpu/fmha_prebuilt.tgz -C .gpu/fmha_prebuilt .
fi
ls -la .gpu/whl .gpu/bundle.tar
du -sh .gpu --exclude=cache-build
