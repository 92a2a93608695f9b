// Torch-free check of the CUDA kernels in csrc/adam_cuda.cu against the host adam_element: six
// tensors (fp32, bf16 + fp32 master, fp16, bf16 state, misaligned views, amsgrad, an in-kernel
// grad unscale), three steps in one launch each, then the 2-/inf-norm and clip kernels.
// Built and run by tests/optim/test_fused_adam.py::test_cuda_kernels_standalone (needs nvcc + a GPU):
//   nvcc -std=c++17 -O3 -Icsrc tests/optim/adam_kernel_check.cu csrc/adam_cuda.cu -o /tmp/kt && /tmp/kt

#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "adam_cuda.h"
#include "adam_host.h"
using namespace ff;
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s line %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)
static float rnd() { return (float)rand() / RAND_MAX * 2.f - 1.f; }
static float h2f(uint16_t b, int dt) { if (dt == kBF16) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; } __half h; memcpy(&h, &b, 2); return __half2float(h); }
static uint16_t f2h(float f, int dt) { uint16_t b; if (dt == kBF16) { __nv_bfloat16 x = __float2bfloat16_rn(f); memcpy(&b, &x, 2); } else { __half x = __float2half_rn(f); memcpy(&b, &x, 2); } return b; }
struct T { int64_t n; int pd, sd, ams, master, off; std::vector<float> p, g, m, v, x, mp; void *dp, *dg, *dm, *dv, *dx; float* dmp; };
static void* up(const std::vector<float>& a, int dt, int off) {
  size_t es = dt == kF32 ? 4 : 2; char* d; CK(cudaMalloc(&d, (a.size() + 8) * es)); d += off * es;
  if (dt == kF32) CK(cudaMemcpy(d, a.data(), a.size() * 4, cudaMemcpyHostToDevice));
  else { std::vector<uint16_t> b(a.size()); for (size_t i = 0; i < a.size(); ++i) b[i] = f2h(a[i], dt); CK(cudaMemcpy(d, b.data(), b.size() * 2, cudaMemcpyHostToDevice)); }
  return d; }
static std::vector<float> down(void* d, size_t n, int dt) {
  std::vector<float> a(n); if (dt == kF32) { CK(cudaMemcpy(a.data(), d, n * 4, cudaMemcpyDeviceToHost)); return a; }
  std::vector<uint16_t> b(n); CK(cudaMemcpy(b.data(), d, n * 2, cudaMemcpyDeviceToHost)); for (size_t i = 0; i < n; ++i) a[i] = h2f(b[i], dt); return a; }
static float rt(float f, int dt) { return dt == kF32 ? f : h2f(f2h(f, dt), dt); }
int main() {
  int64_t sizes[] = {1, 7, 33 * 65, 1000003, 3 * kCudaChunk + 5, 4096};
  int cfg[][5] = {{kF32, kF32, 0, 0, 0}, {kF32, kF32, 1, 0, 0}, {kBF16, kF32, 1, 1, 0}, {kF16, kF16, 0, 0, 0}, {kBF16, kBF16, 1, 0, 1}, {kF32, kF32, 0, 0, 1}};
  std::vector<T> ts; int64_t chunks = 0; std::vector<AdamTensorDesc> rows;
  double grow[8] = {0.01, 0.9, 0.99, 1e-8, 0.05, 1, 0, 0};
  for (int k = 0; k < 6; ++k) {
    T t; t.n = sizes[k]; t.pd = cfg[k][0]; t.sd = cfg[k][1]; t.ams = cfg[k][2]; t.master = cfg[k][3]; t.off = cfg[k][4];
    for (int64_t i = 0; i < t.n; ++i) { t.p.push_back(rt(rnd(), t.pd)); t.g.push_back(rt(rnd(), t.pd)); t.m.push_back(rt(rnd() * .1f, t.sd)); t.v.push_back(rt(fabsf(rnd()) * .01f, t.sd)); t.x.push_back(rt(fabsf(rnd()) * .02f, t.sd)); }
    t.mp = t.p;
    t.dp = up(t.p, t.pd, t.off); t.dg = up(t.g, t.pd, t.off); t.dm = up(t.m, t.sd, t.off); t.dv = up(t.v, t.sd, t.off);
    t.dx = t.ams ? up(t.x, t.sd, t.off) : nullptr; t.dmp = t.master ? (float*)up(t.mp, kF32, t.off) : nullptr;
    ts.push_back(t);
  }
  float scale = 4.f; float* dscale; CK(cudaMalloc(&dscale, 4)); CK(cudaMemcpy(dscale, &scale, 4, cudaMemcpyHostToDevice));
  float step = 0.f;
  for (int s = 0; s < 3; ++s) {
    float st = step; rows.clear(); chunks = 0;
    for (auto& t : ts) {
      grow[7] = t.ams; st = step; AdamHyper h = advance_step(&st, grow);
      AdamTensorDesc d{}; d.p = t.dp; d.g = t.dg; d.m = t.dm; d.v = t.dv; d.vmax = t.dx; d.master = t.dmp; d.n = t.n; d.chunk_begin = chunks; d.h = h;
      d.p_dtype = t.pd; d.s_dtype = t.sd; d.aligned = t.off == 0; chunks += (t.n + kCudaChunk - 1) / kCudaChunk; rows.push_back(d);
      for (int64_t i = 0; i < t.n; ++i) {  // host reference
        float g = t.g[i] / (s == 0 ? scale : 1.f); t.g[i] = rt(g, t.pd);
        float p = t.master ? t.mp[i] : t.p[i], m = t.m[i], v = t.v[i], x = t.x[i];
        adam_element(p, t.g[i], m, v, x, h, t.ams);
        if (t.master) t.mp[i] = p; t.p[i] = rt(p, t.pd); t.m[i] = rt(m, t.sd); t.v[i] = rt(v, t.sd); if (t.ams) t.x[i] = rt(x, t.sd);
      }
    }
    step = st;
    AdamTensorDesc* dd; CK(cudaMalloc(&dd, rows.size() * sizeof(AdamTensorDesc)));
    CK(cudaMemcpy(dd, rows.data(), rows.size() * sizeof(AdamTensorDesc), cudaMemcpyHostToDevice));
    CK(adam_cuda_step(dd, (int)rows.size(), chunks, s == 0 ? dscale : nullptr, 0)); CK(cudaDeviceSynchronize());
  }
  bool ok = true;
  for (size_t k = 0; k < ts.size(); ++k) {
    T& t = ts[k]; double e[5] = {0, 0, 0, 0, 0};
    auto cmp = [&](int j, const std::vector<float>& ref, void* d, int dt) { auto a = down(d, t.n, dt); double num = 0, den = 0; for (int64_t i = 0; i < t.n; ++i) { num += (a[i] - ref[i]) * (double)(a[i] - ref[i]); den += ref[i] * (double)ref[i]; } e[j] = sqrt(num / (den + 1e-30)); };
    cmp(0, t.p, t.dp, t.pd); cmp(1, t.m, t.dm, t.sd); cmp(2, t.v, t.dv, t.sd); cmp(3, t.g, t.dg, t.pd);
    if (t.master) cmp(4, t.mp, t.dmp, kF32);
    double tol = t.pd == kF32 && t.sd == kF32 ? 1e-5 : 1e-2;
    bool good = e[0] < tol && e[1] < tol && e[2] < tol && e[3] < tol && e[4] < tol; ok &= good;
    printf("tensor %zu n=%lld pd=%d sd=%d ams=%d master=%d off=%d  p %.2e m %.2e v %.2e g %.2e master %.2e %s\n", k, (long long)t.n, t.pd, t.sd, t.ams, t.master, t.off, e[0], e[1], e[2], e[3], e[4], good ? "ok" : "BAD");
  }
  // norms + clip over the gradients (now unscaled) of every tensor
  std::vector<NormTensorDesc> nr; chunks = 0; double ss = 0, mx = 0;
  for (auto& t : ts) { NormTensorDesc d{}; d.x = t.dg; d.n = t.n; d.chunk_begin = chunks; d.dtype = t.pd; d.aligned = t.off == 0; chunks += (t.n + kCudaChunk - 1) / kCudaChunk; nr.push_back(d);
    for (float g : t.g) { ss += (double)g * g; mx = fmax(mx, fabs(g)); } }
  NormTensorDesc* dn; CK(cudaMalloc(&dn, nr.size() * sizeof(NormTensorDesc))); CK(cudaMemcpy(dn, nr.data(), nr.size() * sizeof(NormTensorDesc), cudaMemcpyHostToDevice));
  double* parts; CK(cudaMalloc(&parts, norm_partial_blocks(chunks) * 8)); float* out; CK(cudaMalloc(&out, 4)); float o2, oi;
  CK(multi_norm_cuda(dn, (int)nr.size(), chunks, false, parts, out, 0)); CK(cudaMemcpy(&o2, out, 4, cudaMemcpyDeviceToHost));
  CK(multi_norm_cuda(dn, (int)nr.size(), chunks, true, parts, out, 0)); CK(cudaMemcpy(&oi, out, 4, cudaMemcpyDeviceToHost));
  printf("norm2 %.6f ref %.6f  norminf %.6f ref %.6f\n", o2, sqrt(ss), oi, mx);
  ok &= fabs(o2 - sqrt(ss)) < 1e-5 * sqrt(ss) && oi == (float)mx;
  float tn = (float)sqrt(ss); CK(cudaMemcpy(out, &tn, 4, cudaMemcpyHostToDevice));
  CK(clip_scale_cuda(dn, (int)nr.size(), chunks, out, 1.0f, 0)); CK(cudaDeviceSynchronize());
  auto a = down(ts[2].dg, ts[2].n, ts[2].pd); float coef = 1.0f / (tn + 1e-6f); double num = 0, den = 0;
  for (int64_t i = 0; i < ts[2].n; ++i) { float r = rt(ts[2].g[i] * coef, ts[2].pd); num += (a[i] - r) * (double)(a[i] - r); den += (double)r * r; }
  printf("clip rel err %.2e\n", sqrt(num / den)); ok &= sqrt(num / den) < 1e-6;
  printf(ok ? "KERNEL TEST PASS\n" : "KERNEL TEST FAIL\n");
  return ok ? 0 : 1;
}
