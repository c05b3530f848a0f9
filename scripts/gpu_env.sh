# Source on the GPU box (from the repo root): installs carried wheels, puts the packages on PYTHONPATH and
# imports the carried msa-cache bundle as a read-only tier. No network and no cutlass-dsl needed there.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/packages/msa-cache/src:$PWD/packages/msa-core/src:$PWD/packages/msa-cute/src:$PWD/packages/msa-bridge/src:$PWD
export MSA_CACHE_DIR=/tmp/msa-cache PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
for b in .gpu/bundle.tar .gpu/bundle.tar.gz; do
  if [ -f "$b" ]; then python3 -m msa.cache.cli import "$b" || return 1; fi
done
# fmha_sm90 modules prebuilt on the build host (scripts/gpu_payload.sh FMHA_PREBUILT=1): the box has no CUTLASS headers
if [ -f .gpu/fmha_prebuilt.tgz ]; then
  mkdir -p /tmp/fmha_prebuilt && tar -xzf .gpu/fmha_prebuilt.tgz -C /tmp/fmha_prebuilt || return 1
  export MSA_FMHA_SM90_PREBUILT=/tmp/fmha_prebuilt
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
