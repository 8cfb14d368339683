// Device discovery for the Python probe (lepton_core/_cuda_backend.py): what the driver offers and
// whether this build carries a kernel image the GPU can run.
#include "api.h"
#include "common.cuh"

#include <cstdio>

#ifndef LP_CUDA_ARCHS
#define LP_CUDA_ARCHS "unknown"
#endif

namespace lp {
namespace cuda {
namespace {

// Compiled for the same targets as every other kernel: if the driver finds an image for it, it finds
// one for all of them.
__global__ void image_probe_kernel(int* out) {
  if (out != nullptr) *out = 1;
}

std::string error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

}  // namespace

std::pair<int, std::string> device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky, but leave no trace for the next call
    return {0, error_text(err)};
  }
  if (n == 0) return {0, "the CUDA runtime found no device"};
  return {n, ""};
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

const char* built_archs() { return LP_CUDA_ARCHS; }

std::string device_name(int device) {
  cudaDeviceProp prop{};
  LP_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

std::string device_check(int device) {
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return "querying CUDA device " + std::to_string(device) + " failed (" + error_text(err) + ")";
  }
  char cc[32];
  std::snprintf(cc, sizeof(cc), "%d.%d", major, minor);
  if (major < 8) {
    return "the GPU has compute capability " + std::string(cc) +
           "; lepton_core's CUDA kernels (cp.async, bf16 mma.sync) need 8.0 (Ampere) or newer";
  }
  int prev = 0;
  LP_CUDA_CHECK(cudaGetDevice(&prev));
  if (prev != device) LP_CUDA_CHECK(cudaSetDevice(device));
  cudaFuncAttributes attr{};
  err = cudaFuncGetAttributes(&attr, image_probe_kernel);
  if (prev != device) cudaSetDevice(prev);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return "this build of lepton_core has no kernel image for compute capability " + std::string(cc) +
           " (built for LEPTON_CUDA_ARCHS=" LP_CUDA_ARCHS "; " + error_text(err) +
           "); rebuild with that architecture, see setup_cuda.md";
  }
  return "";
}

}  // namespace cuda
}  // namespace lp
