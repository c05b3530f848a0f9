// Shared helpers for msa-core tvm-ffi bindings: argument checks with clear messages, the caller's stream.
#pragma once
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>

#define MSA_CUDA_CHECK(expr)                                                                  \
  do {                                                                                        \
    cudaError_t msa_err__ = (expr);                                                           \
    TVM_FFI_ICHECK(msa_err__ == cudaSuccess) << #expr << " failed: " << cudaGetErrorString(msa_err__); \
  } while (0)

namespace msa {

// The stream the caller (torch) is currently on, as set through DLPack/tvm-ffi for this device.
inline cudaStream_t stream_of(const tvm::ffi::TensorView& t) {
  DLDevice dev = t.device();
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(dev.device_type, dev.device_id));
}

inline void check_cuda_tensor(const tvm::ffi::TensorView& t, const char* name, DLDataTypeCode code, int bits,
                              int ndim) {
  TVM_FFI_ICHECK(t.device().device_type == kDLCUDA) << name << ": expected a CUDA tensor";
  TVM_FFI_ICHECK(t.dtype().code == code && t.dtype().bits == bits)
      << name << ": expected dtype code " << static_cast<int>(code) << "/" << bits << " bits, got "
      << static_cast<int>(t.dtype().code) << "/" << static_cast<int>(t.dtype().bits);
  TVM_FFI_ICHECK(ndim < 0 || t.ndim() == ndim) << name << ": expected " << ndim << " dims, got " << t.ndim();
}

}  // namespace msa
