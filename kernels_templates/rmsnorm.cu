// rmsnorm.cu — RMSNorm as HF LlamaRMSNorm computes it, and the fused residual-add variant.
//
//   rmsnorm<H>(x, w, out, T, eps):
//     r = rsqrt(mean_j(x[t,j]^2) + eps)            (f32 statistics)
//     out[t,j] = bf16( w[j] * bf16(x[t,j] * r) )  (normalize in f32, cast to bf16, times weight)
//   add_rmsnorm<H>(residual, x, w, out, T, eps):
//     h = bf16(residual[t,j] + x[t,j]);  residual[t,j] = h;  out = rmsnorm(h)
//     (the decoder layer's `hidden = residual + hidden; normed = norm(hidden)` in one pass)
//
// x, residual, out: [T, H] bf16 row-major, 16-byte aligned; w: [H] bf16. H % 8 == 0.
// out may alias x (each thread reads its elements before writing them), not residual.
// Launch: grid (T), block RmsCfg<H>::THREADS = min(256, roundup(H/8, 32)). Any T >= 0.
#include "common.cuh"

template <int H>
struct RmsCfg {
  static_assert(H % 8 == 0, "rmsnorm: H must be a multiple of 8");
  static constexpr int VEC = H / 8;
  static constexpr int THREADS = VEC >= 256 ? 256 : (VEC + 31) / 32 * 32;
  static constexpr int ITEMS = (VEC + THREADS - 1) / THREADS;
};

// Normalizes the row held in v (ITEMS vectors of 8 per thread) and writes it to out_row.
template <int H>
__device__ __forceinline__ void rms_finish(float (&v)[RmsCfg<H>::ITEMS][8], float ss,
                                           const bf16* __restrict__ w, bf16* out_row, float eps,
                                           float* scratch) {
  typedef RmsCfg<H> C;
  ss = kiln::block_sum(ss, scratch);
  const float r = rsqrtf(ss * (1.0f / H) + eps);
#pragma unroll
  for (int i = 0; i < C::ITEMS; ++i) {
    const int idx = threadIdx.x + i * C::THREADS;
    if (C::VEC % C::THREADS == 0 || idx < C::VEC) {
      // v holds exact bf16 values (read from bf16 or rounded to it), so repacking is lossless.
      reinterpret_cast<uint4*>(out_row)[idx] = kiln::rms_apply8(kiln::pack8(v[i]), kiln::ld_cached16(w + idx * 8), r);
    }
  }
}

template <int H>
__global__ void __launch_bounds__(RmsCfg<H>::THREADS)
rmsnorm(const bf16* x, const bf16* __restrict__ w, bf16* out, int T, float eps) {
  kiln::pdl_sync();
  typedef RmsCfg<H> C;
  __shared__ float scratch[32];
  const int t = blockIdx.x;
  if (t >= T) return;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (long long)t * H);
  float v[C::ITEMS][8];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < C::ITEMS; ++i) {
    const int idx = threadIdx.x + i * C::THREADS;
    if (C::VEC % C::THREADS == 0 || idx < C::VEC) {
      kiln::unpack8(xr[idx], v[i]);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss = fmaf(v[i][j], v[i][j], ss);
    }
  }
  rms_finish<H>(v, ss, w, out + (long long)t * H, eps, scratch);
}

template <int H>
__global__ void __launch_bounds__(RmsCfg<H>::THREADS)
add_rmsnorm(bf16* residual, const bf16* x, const bf16* __restrict__ w, bf16* out, int T, float eps) {
  kiln::pdl_sync();
  typedef RmsCfg<H> C;
  __shared__ float scratch[32];
  const int t = blockIdx.x;
  if (t >= T) return;
  uint4* rr = reinterpret_cast<uint4*>(residual + (long long)t * H);
  const uint4* xr = reinterpret_cast<const uint4*>(x + (long long)t * H);
  float v[C::ITEMS][8];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < C::ITEMS; ++i) {
    const int idx = threadIdx.x + i * C::THREADS;
    if (C::VEC % C::THREADS == 0 || idx < C::VEC) {
      float a[8], b[8];
      kiln::unpack8(rr[idx], a);
      kiln::unpack8(xr[idx], b);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[i][j] = __bfloat162float(__float2bfloat16_rn(a[j] + b[j]));
      rr[idx] = kiln::pack8(v[i]);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss = fmaf(v[i][j], v[i][j], ss);
    }
  }
  rms_finish<H>(v, ss, w, out + (long long)t * H, eps, scratch);
}
