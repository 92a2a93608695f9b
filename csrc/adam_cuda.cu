// CUDA kernels of the fused optimizer: multi-tensor Adam/AdamW, multi-tensor norm, clip scaling.
// Torch-free (raw pointers, sizes, a cudaStream_t) so it compiles with plain nvcc; the torch binding
// lives in adam_cuda_binding.cpp.
//
// Multi-tensor apply: every tensor is cut into chunks of kCudaChunk elements; block b works on the
// global chunks b, b + gridDim.x, ... and finds each chunk's tensor by binary search in the table
// of AdamTensorDesc rows (device memory). One launch per step, whatever the number of tensors.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "adam_cuda.h"

namespace ff {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxBlocks = 1 << 20;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N elements at ptr (16-byte aligned) through 16-byte loads / stores.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[N]) {
  constexpr int kPer = 16 / sizeof(T);
  static_assert(N % kPer == 0, "vector width must cover whole 16-byte words");
#pragma unroll
  for (int k = 0; k < N / kPer; ++k) {
    uint4 raw = *reinterpret_cast<const uint4*>(ptr + k * kPer);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[k * kPer + j] = to_f(e[j]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[N]) {
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int k = 0; k < N / kPer; ++k) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPer; ++j) e[j] = from_f<T>(in[k * kPer + j]);
    *reinterpret_cast<uint4*>(ptr + k * kPer) = raw;
  }
}

// The chunk of global index c: binary search for the last tensor whose chunk_begin <= c.
template <typename Desc>
__device__ __forceinline__ int find_tensor(const Desc* descs, int ntensors, int64_t c) {
  int lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (descs[mid].chunk_begin <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// 1. Adam over elements [b, e) of one tensor. P: param/grad type, S: state type, N: elements per
//    thread (16 bytes of P), MASTER: fp32 master weights are the parameter, p only receives the rounding.
template <typename P, typename S, bool MASTER, bool AMS>
__device__ void adam_chunk(const AdamTensorDesc& d, int64_t b, int64_t e, const float* grad_scale) {
  constexpr int N = 16 / sizeof(P);
  P* p = static_cast<P*>(d.p);
  P* g = static_cast<P*>(d.g);
  S* m = static_cast<S*>(d.m);
  S* v = static_cast<S*>(d.v);
  S* vmax = static_cast<S*>(d.vmax);
  float* master = d.master;
  const AdamHyper h = d.h;
  const bool unscale = grad_scale != nullptr;
  const float scale = unscale ? *grad_scale : 1.0f;
  // 1a. Vector body: N elements per thread per iteration, 16-byte loads.
  int64_t i = b + (int64_t)threadIdx.x * N;
  if (d.aligned) {
    for (; i + N <= e; i += (int64_t)blockDim.x * N) {
      float rp[N], rg[N], rm[N], rv[N], rx[N];
      load_vec<P, N>(g + i, rg);
      if (MASTER) load_vec<float, N>(master + i, rp); else load_vec<P, N>(p + i, rp);
      load_vec<S, N>(m + i, rm);
      load_vec<S, N>(v + i, rv);
      if (AMS) load_vec<S, N>(vmax + i, rx);
      if (unscale) {
#pragma unroll
        for (int k = 0; k < N; ++k) rg[k] = rg[k] / scale;
        store_vec<P, N>(g + i, rg);  // like torch's fused Adam: the gradient is left unscaled
      }
#pragma unroll
      for (int k = 0; k < N; ++k) adam_element(rp[k], rg[k], rm[k], rv[k], rx[k], h, AMS);
      if (MASTER) store_vec<float, N>(master + i, rp);
      store_vec<P, N>(p + i, rp);
      store_vec<S, N>(m + i, rm);
      store_vec<S, N>(v + i, rv);
      if (AMS) store_vec<S, N>(vmax + i, rx);
    }
    // 1b. The tail (< N elements) of the chunk, one element per thread.
    i = e - ((e - b) % N) + threadIdx.x;
    if (i >= e) return;
  } else {
    i = b + threadIdx.x;
  }
  for (; i < e; i += blockDim.x) {
    float gi = to_f(g[i]);
    if (unscale) {
      gi = gi / scale;
      g[i] = from_f<P>(gi);
    }
    float pi = MASTER ? master[i] : to_f(p[i]);
    float mi = to_f(m[i]), vi = to_f(v[i]), xi = AMS ? to_f(vmax[i]) : 0.0f;
    adam_element(pi, gi, mi, vi, xi, h, AMS);
    if (MASTER) master[i] = pi;
    p[i] = from_f<P>(pi);
    m[i] = from_f<S>(mi);
    v[i] = from_f<S>(vi);
    if (AMS) vmax[i] = from_f<S>(xi);
  }
}

template <typename P, typename S, bool MASTER>
__device__ __forceinline__ void adam_chunk_ams(const AdamTensorDesc& d, int64_t b, int64_t e, const float* gs) {
  if (d.h.amsgrad) adam_chunk<P, S, MASTER, true>(d, b, e, gs);
  else adam_chunk<P, S, MASTER, false>(d, b, e, gs);
}

// 2. The step kernel: every block walks its chunks; the branch on dtypes is uniform per block.
__global__ void __launch_bounds__(kThreads) adam_kernel(const AdamTensorDesc* __restrict__ descs, int ntensors,
                                                        int64_t total_chunks, const float* grad_scale) {
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int t = find_tensor(descs, ntensors, c);
    const AdamTensorDesc d = descs[t];
    const int64_t b = (c - d.chunk_begin) * kCudaChunk;
    const int64_t e = b + kCudaChunk < d.n ? b + kCudaChunk : d.n;
    const bool master = d.master != nullptr;
    if (d.p_dtype == kF32) {
      adam_chunk_ams<float, float, false>(d, b, e, grad_scale);
    } else if (d.p_dtype == kF16) {
      if (d.s_dtype == kF32) {
        if (master) adam_chunk_ams<__half, float, true>(d, b, e, grad_scale);
        else adam_chunk_ams<__half, float, false>(d, b, e, grad_scale);
      } else {
        adam_chunk_ams<__half, __half, false>(d, b, e, grad_scale);
      }
    } else {
      if (d.s_dtype == kF32) {
        if (master) adam_chunk_ams<__nv_bfloat16, float, true>(d, b, e, grad_scale);
        else adam_chunk_ams<__nv_bfloat16, float, false>(d, b, e, grad_scale);
      } else {
        adam_chunk_ams<__nv_bfloat16, __nv_bfloat16, false>(d, b, e, grad_scale);
      }
    }
  }
}

int num_blocks(int64_t total_chunks) {
  return (int)(total_chunks < kMaxBlocks ? total_chunks : kMaxBlocks);
}

// 3. Norm: per-block partials (sum of squares or max |x|) in double, then one block combines them.

// One reduction step: the running max, NaN-propagating (inf-norm), or the running sum (2-norm).
template <typename T>
__device__ __forceinline__ T combine(T acc, T y, bool inf) {
  return inf ? (y > acc || y != y ? y : acc) : acc + y;
}

template <typename T>
__device__ void norm_chunk(const NormTensorDesc& d, int64_t b, int64_t e, bool inf, float& acc) {
  constexpr int N = 16 / sizeof(T);
  const T* x = static_cast<const T*>(d.x);
  int64_t i = b + (int64_t)threadIdx.x * N;
  if (d.aligned) {
    for (; i + N <= e; i += (int64_t)blockDim.x * N) {
      float r[N];
      load_vec<T, N>(x + i, r);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float a = fabsf(r[k]);
        acc = inf ? (a > acc || a != a ? a : acc) : acc + a * a;
      }
    }
    i = e - ((e - b) % N) + threadIdx.x;
  } else {
    i = b + threadIdx.x;
  }
  for (; i < e; i += blockDim.x) {
    const float a = fabsf(to_f(x[i]));
    acc = inf ? (a > acc || a != a ? a : acc) : acc + a * a;
  }
}

__device__ double block_reduce(double x, bool inf) {
  __shared__ double s[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    x = combine(x, __shfl_down_sync(0xffffffffu, x, o), inf);
  }
  if (lane == 0) s[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < (int)(blockDim.x >> 5) ? s[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) {
      x = combine(x, __shfl_down_sync(0xffffffffu, x, o), inf);
    }
  }
  __syncthreads();
  return x;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads) norm_partial_kernel(const NormTensorDesc* __restrict__ descs, int ntensors,
                                                                int64_t total_chunks, bool inf, double* partials) {
  double acc = 0.0;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const NormTensorDesc d = descs[find_tensor(descs, ntensors, c)];
    const int64_t b = (c - d.chunk_begin) * kCudaChunk;
    const int64_t e = b + kCudaChunk < d.n ? b + kCudaChunk : d.n;
    float part = 0.0f;  // one chunk per thread is short enough for fp32; chunks add up in double
    if (d.dtype == kF32) norm_chunk<float>(d, b, e, inf, part);
    else if (d.dtype == kF16) norm_chunk<__half>(d, b, e, inf, part);
    else norm_chunk<__nv_bfloat16>(d, b, e, inf, part);
    acc = combine(acc, (double)part, inf);
  }
  acc = block_reduce(acc, inf);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void norm_final_kernel(const double* partials, int n, bool inf, float* out) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc = combine(acc, partials[i], inf);
  acc = block_reduce(acc, inf);
  if (threadIdx.x == 0) *out = (float)(inf ? acc : sqrt(acc));
}

template <typename T>
__device__ void scale_chunk(const NormTensorDesc& d, int64_t b, int64_t e, float coef) {
  constexpr int N = 16 / sizeof(T);
  T* x = static_cast<T*>(d.x);
  int64_t i = b + (int64_t)threadIdx.x * N;
  if (d.aligned) {
    for (; i + N <= e; i += (int64_t)blockDim.x * N) {
      float r[N];
      load_vec<T, N>(x + i, r);
#pragma unroll
      for (int k = 0; k < N; ++k) r[k] *= coef;
      store_vec<T, N>(x + i, r);
    }
    i = e - ((e - b) % N) + threadIdx.x;
  } else {
    i = b + threadIdx.x;
  }
  for (; i < e; i += blockDim.x) x[i] = from_f<T>(to_f(x[i]) * coef);
}

__global__ void __launch_bounds__(kThreads) clip_scale_kernel(const NormTensorDesc* __restrict__ descs, int ntensors,
                                                              int64_t total_chunks, const float* total_norm,
                                                              float max_norm) {
  // Same fp32 arithmetic as torch.nn.utils.clip_grad_norm_; NaN stays NaN (as torch.clamp).
  float coef = max_norm / (*total_norm + 1e-6f);
  coef = coef > 1.0f ? 1.0f : coef;
  if (coef == 1.0f) return;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const NormTensorDesc d = descs[find_tensor(descs, ntensors, c)];
    const int64_t b = (c - d.chunk_begin) * kCudaChunk;
    const int64_t e = b + kCudaChunk < d.n ? b + kCudaChunk : d.n;
    if (d.dtype == kF32) scale_chunk<float>(d, b, e, coef);
    else if (d.dtype == kF16) scale_chunk<__half>(d, b, e, coef);
    else scale_chunk<__nv_bfloat16>(d, b, e, coef);
  }
}

}  // namespace

cudaError_t cuda_kernels_probe() {
  // cudaFuncGetAttributes loads a kernel's code for the current device, so it fails exactly where a
  // launch would fail with "no kernel image is available" (no SASS for this architecture and no PTX
  // it can JIT, e.g. the default sm_80/sm_90 build, which carries compute_90 PTX, on a T4 or a V100).
  // That error is not sticky, but it stays as the thread's last error: clear it, or torch's next
  // launch check would report it as its own.
  const void* kernels[] = {reinterpret_cast<const void*>(&adam_kernel),
                           reinterpret_cast<const void*>(&norm_partial_kernel),
                           reinterpret_cast<const void*>(&norm_final_kernel),
                           reinterpret_cast<const void*>(&clip_scale_kernel)};
  for (const void* k : kernels) {
    cudaFuncAttributes attr;
    const cudaError_t err = cudaFuncGetAttributes(&attr, k);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return err;
    }
  }
  return cudaSuccess;
}

cudaError_t adam_cuda_step(const AdamTensorDesc* descs, int ntensors, int64_t total_chunks, const float* grad_scale,
                           cudaStream_t stream) {
  if (ntensors == 0 || total_chunks == 0) return cudaSuccess;
  adam_kernel<<<num_blocks(total_chunks), kThreads, 0, stream>>>(descs, ntensors, total_chunks, grad_scale);
  return cudaGetLastError();
}

int norm_partial_blocks(int64_t total_chunks) {
  // Few enough partials for one final block; enough blocks to fill the GPU.
  const int64_t cap = 1024;
  return (int)(total_chunks < cap ? (total_chunks > 0 ? total_chunks : 1) : cap);
}

cudaError_t multi_norm_cuda(const NormTensorDesc* descs, int ntensors, int64_t total_chunks, bool inf_norm,
                            double* partials, float* out, cudaStream_t stream) {
  const int nb = norm_partial_blocks(total_chunks);
  norm_partial_kernel<<<nb, kThreads, 0, stream>>>(descs, ntensors, total_chunks, inf_norm, partials);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  norm_final_kernel<<<1, 1024, 0, stream>>>(partials, nb, inf_norm, out);
  return cudaGetLastError();
}

cudaError_t clip_scale_cuda(const NormTensorDesc* descs, int ntensors, int64_t total_chunks, const float* total_norm,
                            float max_norm, cudaStream_t stream) {
  if (ntensors == 0 || total_chunks == 0) return cudaSuccess;
  clip_scale_kernel<<<num_blocks(total_chunks), kThreads, 0, stream>>>(descs, ntensors, total_chunks, total_norm,
                                                                       max_norm);
  return cudaGetLastError();
}

}  // namespace ff
