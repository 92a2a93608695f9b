// Flush-to-zero (FTZ) and denormals-are-zero (DAZ) on every CPU thread that runs the kernels.
//
// Denormal floats (|x| < 1.2e-38 in fp32) take a microcode assist on x86: an operation that reads or
// writes one costs tens to hundreds of cycles. A model that trains for a while produces them (softmax
// probabilities of far-off keys, activation tails, their gradients), and a CPU training step gets
// slower as training goes on. FTZ writes such results as 0 and DAZ reads such inputs as 0.
//
// The two bits live in each thread's MXCSR register. torch.set_flush_denormal sets them only for the
// calling thread: the intra-op worker threads, created earlier, keep theirs. This op sets them on the
// calling thread, on each thread of torch's intra-op pool and on each thread of this extension's own
// OpenMP loops (adam_cpu.cpp), and returns the calling thread's previous mode.
//
//   set_flush_denormal_all(on) -> int    1: the calling thread had both bits on, 0: not, -1: not x86
//                                         (nothing is changed there)

#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64) || defined(__SSE__)
#include <xmmintrin.h>
#define FF_HAS_MXCSR 1
#endif

namespace {

#ifdef FF_HAS_MXCSR
constexpr unsigned kDenormalsAreZero = 0x0040;
constexpr unsigned kFlushToZero = 0x8000;
constexpr unsigned kBoth = kDenormalsAreZero | kFlushToZero;
#endif

// the calling thread's mode before the change: 1 / 0, or -1 without MXCSR
int64_t set_this_thread(bool on) {
#ifdef FF_HAS_MXCSR
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(on ? (csr | kBoth) : (csr & ~kBoth));
  return (csr & kBoth) == kBoth ? 1 : 0;
#else
  (void)on;
  return -1;
#endif
}

int64_t set_flush_denormal_all(bool on) {
  const int64_t previous = set_this_thread(on);
  if (previous < 0) {
    return previous;
  }
  // torch's pool: at::parallel_for over as many items as threads, grain 1, gives each thread one item
  const int64_t n = at::get_num_threads();
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { set_this_thread(on); });
  // this extension's OpenMP loops (the same pool when both use one OpenMP runtime; harmless if so)
#pragma omp parallel num_threads(static_cast<int>(n))
  { set_this_thread(on); }
  return previous;
}

}  // namespace

// no tensor arguments, nothing to dispatch on: a catch-all kernel
TORCH_LIBRARY_FRAGMENT(fastformer, m) { m.def("set_flush_denormal_all(bool on) -> int", &set_flush_denormal_all); }
