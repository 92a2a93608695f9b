// Flush-to-zero (FTZ) and denormals-are-zero (DAZ) on every CPU thread that runs the kernels.
//
// Denormal floats (|x| < 1.2e-38 in fp32) take a microcode assist on x86: an operation that reads or
// writes one costs tens to hundreds of cycles. A model that trains for a while produces them (softmax
// probabilities of far-off keys, activation tails, their gradients), and a CPU training step gets
// slower as training goes on. FTZ writes such results as 0 and DAZ reads such inputs as 0.
//
// The two bits live in each thread's MXCSR register. torch.set_flush_denormal sets them only for the
// calling thread: the intra-op worker threads, created earlier, keep theirs. This op sets them on the
// calling thread and on each thread of an OpenMP team of `threads` threads. The team is the process's
// OpenMP pool, the one torch's intra-op loops and adam_cpu.cpp use: torch ships libgomp under the same
// SONAME, so one runtime is loaded. Threads the pool creates later copy their creator's MXCSR.
//
//   set_denormal_mode_all(bits, threads) -> int    bits: a subset of 0x8040 (FTZ | DAZ) to leave set,
//       the others cleared; returns the calling thread's previous bits, or -1 where there is no
//       MXCSR (not x86: nothing is changed). threads: the team size, at least the intra-op pool's.

#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64) || defined(__SSE__)
#include <xmmintrin.h>
#define FF_HAS_MXCSR 1
#endif

namespace {

constexpr int64_t kFlushToZero = 0x8000;
constexpr int64_t kDenormalsAreZero = 0x0040;
constexpr int64_t kBoth = kFlushToZero | kDenormalsAreZero;

// the calling thread's previous FTZ / DAZ bits, or -1 without MXCSR
int64_t set_this_thread(int64_t bits) {
#ifdef FF_HAS_MXCSR
  const unsigned csr = _mm_getcsr();
  _mm_setcsr((csr & ~static_cast<unsigned>(kBoth)) | static_cast<unsigned>(bits & kBoth));
  return static_cast<int64_t>(csr) & kBoth;
#else
  (void)bits;
  return -1;
#endif
}

int64_t set_denormal_mode_all(int64_t bits, int64_t threads) {
  const int64_t previous = set_this_thread(bits);
  if (previous < 0) {
    return previous;
  }
  const int team = static_cast<int>(std::max<int64_t>(threads, omp_get_max_threads()));
  if (team > 1) {
    // every member of the team runs the block once (the caller is member 0)
#pragma omp parallel num_threads(team)
    { set_this_thread(bits); }
  }
  return previous;
}

}  // namespace

// no tensor arguments, nothing to dispatch on: a catch-all kernel
TORCH_LIBRARY_FRAGMENT(fastformer, m) {
  m.def("set_denormal_mode_all(int bits, int threads) -> int", &set_denormal_mode_all);
}
