// gemv_tc.cu — decode-path matrix-vector products on tensor cores, for M <= 8 rows: the same
// contract as gemv.cu, with the batch in the N dimension of an mma.sync m16n8k16.
//
//   gemv_tc<K, MMAX, EPI, OutT>(x, M, w, N, residual, out):
//     acc[m,n] = sum_k x[m,k] * w[n,k]           (f32 accumulation)
//     EPI 0: out = acc;  EPI 1: out = acc + residual[m,n] (may alias out);
//     EPI 2: w has 2N rows (gate, then up): out = silu(x·w[n]) * (x·w[N+n])
//     EPI 3: out = acc + residual[n] (residual: the bias, [N] bf16)
//     EPI 4: EPI 2 with GELU (tanh approximation) for SiLU (GeGLU)
//
// Layouts: x [M, K], w [N, K] (or [2N, K]) bf16 row-major, 16-byte aligned; out [M, N] OutT.
// K % 32 == 0, 1 <= M <= MMAX <= 8, any N >= 1.
// Scheme: a CTA owns 16 weight rows (32 when gated; 8 for the residual epilogue, whose N is the
// model width: twice the CTAs to fill the GPU, the MMA's upper 8 A rows repeating the lower 8 and
// their results unused) and its 8 warps split K in 32-wide chunks
// (warp w takes chunks w, w+8, …, GEMV_TC_UNROLL chunks in flight). Per chunk a lane loads 16
// bytes of weight rows g and g+8 (g = lane/4) at k offset 8·(lane%4) and 16 bytes of x row g,
// and the warp issues two m16n8k16 MMAs: A = the 16 weight rows, B = the (≤ 8) x rows. The k
// order inside a chunk is permuted identically for A and B (a dot product does not care), which
// makes every operand a plain 16-byte load. Weights stream with ld.global.nc.L1::no_allocate,
// L2 fetching 256-byte blocks.
// Partial sums of the 8 warps are reduced through shared memory; warp 0 applies the epilogue.
// Cost is independent of M (the 8 batch columns of the MMA are always computed).
// The first group of weight loads is issued before kiln::pdl_sync() (see common.cuh).
// Launch: grid (ceil(N / 16)), ceil(N / 8) for EPI 1, block GEMV_TC_WARPS*32 = 256, no dynamic
// shared memory.
#include "common.cuh"

// Tuning knobs (the launch code assumes the defaults): warps per CTA (splitting K), and 32-wide
// k chunks in flight per warp.
#ifndef GEMV_TC_WARPS
#define GEMV_TC_WARPS 8
#endif
#ifndef GEMV_TC_UNROLL
#define GEMV_TC_UNROLL 8
#endif

template <typename T> __device__ __forceinline__ T gemv_tc_out(float v);
template <> __device__ __forceinline__ float gemv_tc_out<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 gemv_tc_out<bf16>(float v) { return __float2bfloat16_rn(v); }

// d += a · b  (m16n8k16, bf16 inputs, f32 accumulators)
__device__ __forceinline__ void gemv_tc_mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                            unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int K, int MMAX, int EPI, typename OutT>
__global__ void __launch_bounds__(GEMV_TC_WARPS * 32)
gemv_tc(const bf16* __restrict__ x, int M, const bf16* __restrict__ w, int N, const bf16* residual, OutT* out) {
  static_assert(K % 32 == 0, "gemv_tc: K must be a multiple of 32");
  static_assert(MMAX >= 1 && MMAX <= 8, "gemv_tc: 1 <= MMAX <= 8");
  static_assert(EPI >= 0 && EPI <= 4,
                "gemv_tc: EPI is 0 (plain), 1 (+residual), 2 (gated), 3 (+bias) or 4 (GeGLU)");
  constexpr int NC = K / 32;                // 32-wide k chunks
  constexpr bool GATED = EPI == 2 || EPI == 4;
  constexpr int NA = GATED ? 2 : 1;         // A tiles: the rows, or gate and up rows
  constexpr int U = GEMV_TC_UNROLL;
  __shared__ float red[GEMV_TC_WARPS][NA * 4][32];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  constexpr int HR = EPI == 1 ? 1 : 2;  // distinct 8-row halves of the MMA's A tile
  const int n0 = blockIdx.x * 8 * HR;
  const bf16* wp[NA][2];
#pragma unroll
  for (int a = 0; a < NA; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = min(n0 + g + 8 * (h % HR), N - 1);  // rows past N re-read a valid row, unused
      wp[a][h] = w + ((long long)a * N + n) * K + 8 * t;
    }
  const bool has_x = g < M;
  const bf16* xp = x + (long long)(has_x ? g : 0) * K + 8 * t;

  float acc[NA][4];
#pragma unroll
  for (int a = 0; a < NA; ++a) acc[a][0] = acc[a][1] = acc[a][2] = acc[a][3] = 0.f;

  uint4 wv[U][NA][2];
  auto load_w = [&](int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * GEMV_TC_WARPS;
      if (c < NC) {
#pragma unroll
        for (int a = 0; a < NA; ++a)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            wv[u][a][h] = h < HR ? kiln::ld_stream16_256(wp[a][h] + c * 32) : wv[u][a][0];
      }
    }
  };
  // The first group of weight loads goes out before waiting on the previous kernel (weights do
  // not depend on it); x is read only after kiln::pdl_sync().
  load_w(warp);
  kiln::pdl_sync();
  for (int c0 = warp; c0 < NC; c0 += GEMV_TC_WARPS * U) {
    if (c0 != warp) load_w(c0);
    uint4 xv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * GEMV_TC_WARPS;
      if (c < NC) xv[u] = has_x ? kiln::ld_cached16(xp + c * 32) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * GEMV_TC_WARPS;
      if (c < NC) {
#pragma unroll
        for (int a = 0; a < NA; ++a) {
          gemv_tc_mma(acc[a], wv[u][a][0].x, wv[u][a][1].x, wv[u][a][0].y, wv[u][a][1].y, xv[u].x, xv[u].y);
          gemv_tc_mma(acc[a], wv[u][a][0].z, wv[u][a][1].z, wv[u][a][0].w, wv[u][a][1].w, xv[u].z, xv[u].w);
        }
      }
    }
  }

#pragma unroll
  for (int a = 0; a < NA; ++a)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][a * 4 + i][lane] = acc[a][i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int a = 0; a < NA; ++a)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float s = 0.f;
#pragma unroll
      for (int ww = 0; ww < GEMV_TC_WARPS; ++ww) s += red[ww][a * 4 + i][lane];
      acc[a][i] = s;
    }
  // acc[a][i]: weight row n0 + g + 8*(i/2), batch row 2t + (i%2) (with HR = 1, i/2 = 1 repeats
  // i/2 = 0: skipped, as the residual may alias out).
#pragma unroll
  for (int i = 0; i < 2 * HR; ++i) {
    const int n = n0 + g + 8 * (i >> 1);
    const int m = 2 * t + (i & 1);
    if (n < N && m < M) {
      float v;
      if (GATED) {
        const float gt = acc[0][i], up = acc[NA - 1][i];
        v = kiln::gate_act<EPI == 4>(gt) * up;
      } else {
        v = acc[0][i];
        if (EPI == 1) v += __bfloat162float(residual[(long long)m * N + n]);
        if (EPI == 3) v += __bfloat162float(residual[n]);
      }
      out[(long long)m * N + n] = gemv_tc_out<OutT>(v);
    }
  }
}
