// gemv.cu — decode-path matrix-vector products for M <= MMAX rows (batch-1..8 decode).
//
//   gemv<K, MMAX, EPI, NORM, OutT>(x, M, w, N, residual, out, norm_w, eps):
//     NORM 1 (MMAX 1 only): x is first RMS-normalized with weight norm_w [K] (rmsnorm.cu's
//             rounding): x[k] <- bf16(norm_w[k] * bf16(x[k] * rsqrt(mean_k(x[k]^2) + eps)))
//             (the decoder layer's norm fused into the projection that consumes it)
//     acc[m,n] = sum_k x[m,k] * w[n,k]           (f32 accumulation)
//     EPI 0: out[m,n] = acc[m,n]
//     EPI 1: out[m,n] = acc[m,n] + residual[m,n]  (residual: [M,N] bf16; may alias out)
//     EPI 2: gated MLP, w has 2N rows (gate rows 0..N, then up rows N..2N):
//            out[m,n] = silu(x·w[n]) * (x·w[N+n])
//     EPI 3: out[m,n] = acc[m,n] + residual[n]    (residual: the bias, [N] bf16)
//     EPI 4: EPI 2 with GELU (tanh approximation) for SiLU (GeGLU: Gemma)
//   One rounding to OutT (bf16, or float for logits) at the end.
//
// Layouts: x [M, K] bf16 row-major; w [N, K] (or [2N, K]) bf16 row-major (nn.Linear's layout, no
// transpose); out [M, N] OutT. K % 8 == 0, x and w 16-byte aligned, 1 <= M <= MMAX (M is a runtime
// argument; rows m >= M are neither read nor written), any N >= 1.
// Scheme: GemvCfg::KS warps per GemvCfg::ROWS output columns, each over a contiguous 1/KS of K
// (split-K for the residual GEMVs at M = 1, whose N is the model width, too few rows to fill the
// GPU with one warp per row: KS = 4 for K <= 4096 (the o-projection: 15.3 vs 16.4 µs at 4096²),
// else 2 (the down-projection; 4 was slower there); partial sums meet in shared memory); every
// lane streams 16-byte weight vectors with
// ld.global.nc.L1::no_allocate, UNROLL of them in flight per weight row before any use; x is
// read through L1 (__ldg), shared by all warps; warp shuffle reduction; lanes write the outputs.
// The first UNROLL weight vectors per row are loaded before kiln::pdl_sync() (see common.cuh).
// NORM: after pdl_sync every CTA normalizes the x row into shared memory (K bf16; all threads
// share the sum of squares), and the product reads x from there.
// Launch: grid (ceil(N / (GEMV_WARPS / KS * ROWS))), block GEMV_WARPS*32 = 256, no dynamic shared
// memory.
#include "common.cuh"

// Tuning knobs (the launch code assumes the defaults): warps per CTA, and 16-byte weight loads in
// flight per lane (split over the warp's weight rows).
#ifndef GEMV_WARPS
#define GEMV_WARPS 8
#endif
#ifndef GEMV_LOADS
#define GEMV_LOADS 8
#endif

template <int K, int MMAX, int EPI>
struct GemvCfg {
  static_assert(K % 8 == 0, "gemv: K must be a multiple of 8");
  static_assert(MMAX >= 1 && MMAX <= 16, "gemv: 1 <= MMAX <= 16");
  static_assert(EPI >= 0 && EPI <= 4, "gemv: EPI is 0 (plain), 1 (+residual), 2 (gated), 3 (+bias) or 4 (GeGLU)");
  static constexpr bool GATED = EPI == 2 || EPI == 4;
  static constexpr int ROWS = (MMAX >= 4 && !GATED) ? 2 : 1;  // output columns per warp
  static constexpr int NW = GATED ? 2 : 1;                    // weight rows per output column
  static constexpr int WR = ROWS * NW;                          // weight rows per warp
  static constexpr int UNROLL = GEMV_LOADS / WR > 0 ? GEMV_LOADS / WR : 1;  // vectors in flight per row
  static constexpr int KS =  // warps per output (split-K)
      (MMAX == 1 && EPI == 1) ? (K <= 4096 && K % 32 == 0 ? 4 : (K % 16 == 0 ? 2 : 1)) : 1;
  static_assert(GEMV_WARPS % KS == 0, "gemv: KS must divide GEMV_WARPS");
  static constexpr int SPAN = K / KS;                           // k range of one warp
  static constexpr int CHUNK = 32 * 8;                          // elements per warp step
  static constexpr int STEPS = (SPAN + CHUNK - 1) / CHUNK;
  static constexpr int FULL = STEPS / UNROLL;                   // unguarded groups of steps
  static constexpr int TAIL = STEPS % UNROLL;
};

template <typename T> __device__ __forceinline__ T gemv_out(float v);
template <> __device__ __forceinline__ float gemv_out<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 gemv_out<bf16>(float v) { return __float2bfloat16_rn(v); }

// Loads UN weight vectors per row at steps s0.. (zeros past K when GUARD).
template <int K, int MMAX, int EPI, int UN, bool GUARD>
__device__ __forceinline__ void gemv_load(int s0, int lane, const bf16* const (&wr)[GemvCfg<K, MMAX, EPI>::WR],
                                          uint4 (&wv)[UN][GemvCfg<K, MMAX, EPI>::WR]) {
  typedef GemvCfg<K, MMAX, EPI> C;
#pragma unroll
  for (int u = 0; u < UN; ++u) {
    const int k = (s0 + u) * C::CHUNK + lane * 8;
#pragma unroll
    for (int j = 0; j < C::WR; ++j) {
      if (!GUARD || k < C::SPAN) wv[u][j] = kiln::ld_stream16(wr[j] + k);
      else wv[u][j] = make_uint4(0, 0, 0, 0);
    }
  }
}

// Accumulates the UN loaded weight vectors per row (steps s0..) against the x rows (x points at
// the warp's k range; rows are K apart).
// SMEM_X: x is in shared memory (the normalized row), else in global memory, read through L1.
template <int K, int MMAX, int EPI, bool SMEM_X, int UN, bool GUARD>
__device__ __forceinline__ void gemv_acc(int s0, int lane, const uint4 (&wv)[UN][GemvCfg<K, MMAX, EPI>::WR],
                                         const bf16* __restrict__ x, int M,
                                         float (&acc)[MMAX][GemvCfg<K, MMAX, EPI>::WR]) {
  typedef GemvCfg<K, MMAX, EPI> C;
#pragma unroll
  for (int u = 0; u < UN; ++u) {
    const int k = (s0 + u) * C::CHUNK + lane * 8;
    if (GUARD && k >= C::SPAN) continue;
#pragma unroll
    for (int m = 0; m < MMAX; ++m) {
      if (m < M) {
        const bf16* xp = x + (long long)m * K + k;
        const uint4 xv = SMEM_X ? *reinterpret_cast<const uint4*>(xp) : kiln::ld_cached16(xp);
#pragma unroll
        for (int j = 0; j < C::WR; ++j) acc[m][j] = kiln::dot8(wv[u][j], xv, acc[m][j]);
      }
    }
  }
}

template <int K, int MMAX, int EPI, int NORM, typename OutT>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv(const bf16* __restrict__ x, int M, const bf16* __restrict__ w, int N, const bf16* residual, OutT* out,
     const bf16* __restrict__ norm_w, float eps) {
  typedef GemvCfg<K, MMAX, EPI> C;
  static_assert(NORM == 0 || (NORM == 1 && MMAX == 1), "gemv: NORM is 0, or 1 with MMAX 1");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kp = warp % C::KS;  // which k range
  const int n0 = (blockIdx.x * (GEMV_WARPS / C::KS) + warp / C::KS) * C::ROWS;
  // With KS > 1 or NORM every warp must reach the block barriers.
  if (C::KS == 1 && !NORM && n0 >= N) return;
  const bf16* wr[C::WR];
#pragma unroll
  for (int r = 0; r < C::ROWS; ++r) {
    const int n = min(n0 + r, N - 1);  // a missing last column re-reads a valid row, unused
#pragma unroll
    for (int q = 0; q < C::NW; ++q) wr[r * C::NW + q] = w + ((long long)q * N + n) * K + kp * C::SPAN;
  }
  float acc[MMAX][C::WR];
#pragma unroll
  for (int m = 0; m < MMAX; ++m)
#pragma unroll
    for (int j = 0; j < C::WR; ++j) acc[m][j] = 0.f;

  // The first group of weight loads goes out before waiting on the previous kernel (weights do
  // not depend on it), so the stream is already in flight when x becomes readable.
  constexpr bool GF = C::FULL * C::UNROLL * C::CHUNK > C::SPAN;
  uint4 wv[C::UNROLL][C::WR];
  if (C::FULL > 0) gemv_load<K, MMAX, EPI, C::UNROLL, GF>(0, lane, wr, wv);
  kiln::pdl_sync();
  const bf16* xk = x + kp * C::SPAN;
  if (NORM) {
    __shared__ __align__(16) bf16 xs[NORM ? K : 8];
    __shared__ float red[32];
    kiln::rms_row_to_smem<K, GEMV_WARPS * 32>(x, norm_w, eps, xs, red);
    xk = xs + kp * C::SPAN;
  }
#pragma unroll 1
  for (int g = 0; g < C::FULL; ++g) {
    if (g > 0) gemv_load<K, MMAX, EPI, C::UNROLL, GF>(g * C::UNROLL, lane, wr, wv);
    gemv_acc<K, MMAX, EPI, NORM == 1, C::UNROLL, GF>(g * C::UNROLL, lane, wv, xk, M, acc);
  }
  if (C::TAIL > 0) {
    constexpr int TN = C::TAIL > 0 ? C::TAIL : 1;
    constexpr bool GT = C::SPAN % C::CHUNK != 0;
    uint4 tv[TN][C::WR];
    gemv_load<K, MMAX, EPI, TN, GT>(C::FULL * C::UNROLL, lane, wr, tv);
    gemv_acc<K, MMAX, EPI, NORM == 1, TN, GT>(C::FULL * C::UNROLL, lane, tv, xk, M, acc);
  }

  // Reduce: after the xor-butterfly every lane holds every sum; lane i writes output i.
#pragma unroll
  for (int m = 0; m < MMAX; ++m)
#pragma unroll
    for (int j = 0; j < C::WR; ++j) acc[m][j] = kiln::warp_sum(acc[m][j]);
  if (C::KS > 1) {  // the first warp of each output adds the other k ranges' sums
    __shared__ float part[C::KS > 1 ? GEMV_WARPS : 1][MMAX * C::WR];
    if (kp != 0 && lane == 0) {
#pragma unroll
      for (int m = 0; m < MMAX; ++m)
#pragma unroll
        for (int j = 0; j < C::WR; ++j) part[warp][m * C::WR + j] = acc[m][j];
    }
    __syncthreads();
    if (kp != 0) return;
#pragma unroll
    for (int q = 1; q < C::KS; ++q)
#pragma unroll
      for (int m = 0; m < MMAX; ++m)
#pragma unroll
        for (int j = 0; j < C::WR; ++j) acc[m][j] += part[warp + q][m * C::WR + j];
  }
#pragma unroll
  for (int m = 0; m < MMAX; ++m) {
#pragma unroll
    for (int r = 0; r < C::ROWS; ++r) {
      const int i = m * C::ROWS + r;
      if (lane == (i & 31) && m < M && n0 + r < N) {
        const int n = n0 + r;
        float v;
        if (C::GATED) {
          const float g = acc[m][r * 2], u = acc[m][r * 2 + 1];
          v = kiln::gate_act<EPI == 4>(g) * u;
        } else {
          v = acc[m][r];
          if (EPI == 1) v += __bfloat162float(residual[(long long)m * N + n]);
          if (EPI == 3) v += __bfloat162float(residual[n]);
        }
        out[(long long)m * N + n] = gemv_out<OutT>(v);
      }
    }
  }
}
