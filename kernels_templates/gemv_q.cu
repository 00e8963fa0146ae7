// gemv_q.cu — products with quantized weights (W8A16, W4A16, GGUF Q8_0/Q4_1, W8A8-FP8;
// runtime/src/quant.rs defines the formats): the decode GEMV for M <= 8 rows on tensor cores, and the dequantization of a weight
// to bf16 for the prefill GEMM (cuBLAS then runs it as a 16-bit weight).
//
//   gemv_q<K, EPI, FMT, G, NORM, OutT>(x, M, q, scale, zero, N, residual, out, norm_w, eps):
//     NORM 1 (M = 1 only): x is first RMS-normalized with weight norm_w [K], as gemv.cu's NORM
//             (the decoder layer's norm fused into the projection that consumes it)
//     acc[m,n] = sum_k x[m,k] * w[n,k], w the dequantized weight:
//       FMT 1 (int8):              w[n,k] = q[n,k] * scale[n]
//                                  q i8 [N, K], scale f32 [N]; the MMA runs on the exact codes
//                                  and the f32 sum is scaled: exact dequantization.
//       FMT 2 (int4, symmetric):   w[n,k] = bf16(bf16(q[n,k] - 8) * bf16(scale[n, k/G]))
//       FMT 3 (int4, zero points): w[n,k] = bf16(bf16(q[n,k] - zero[n, k/G]) * bf16(scale[n, k/G]))
//                                  q u4 [N, K] two per byte (column 2j in the low nibble of byte
//                                  j, 2j+1 in the high one), scale f16 [N, ceil(K/G)], zero u8
//                                  [N, ceil(K/G)] (FMT 3 only; pass null for FMT 2).
//                                  q - zero is exact in bf16; the product rounds once.
//       FMT 4 (int4, minimum):     w[n,k] = bf16(q[n,k] * scale[n, k/G] + min[n, k/G])
//                                  codes and scale as FMT 2; `zero` holds the minimums, f16
//                                  [N, ceil(K/G)]. In f32 the product is exact and the sum
//                                  rounds once, as llama.cpp's Q4_1 dequantization; then bf16.
//       FMT 5 (int8, groups):      w[n,k] = bf16(q[n,k] * scale[n, k/G])
//                                  q i8 [N, K], scale f16 [N, ceil(K/G)] (GGUF Q8_0 at G = 32).
//       FMT 6 (fp8, W8A8):         acc[m,n] = sx[m] * scale[n] * sum_k e4m3(x[m,k] / sx[m]) * q[n,k]
//                                  q E4M3 [N, K], scale f32 [N]; sx[m] = max_k |x[m,k]| / 448
//                                  (1 for a zero row), each CTA computing it in its prologue;
//                                  x rounds to E4M3 (x * (1/sx), nearest even, saturating) as
//                                  the MMA operand, and the m16n8k32 E4M3 MMA sums the exact
//                                  products in f32 (quant.rs's `fp8_rows` on the activations).
//     EPI 0: out = acc;  EPI 1: out = acc + residual[m,n] (may alias out);
//     EPI 2: w has 2N rows (gate, then up): out = silu(x·w[n]) * (x·w[N+n])
//     EPI 3: out = acc + residual[n] (residual: the bias, [N] bf16)
//     EPI 4: EPI 2 with GELU (tanh approximation) for SiLU (GeGLU)
//   One rounding to OutT (bf16, or float for logits) at the end.
//
//   dequant<K, FMT, G>(q, scale, zero, R, out): out[r,k] = w[r,k] in bf16 for r < R, k < K, with
//     the same arithmetic as gemv_q (FMT 1: bf16(q * scale), FMT 6: bf16(e4m3(q) * scale), one
//     rounding each), so a prefill GEMM over `out` sees the weights a decode GEMV sees (FMT 2 to
//     5: bit for bit).
//
//   act_fp8<K, CODES>(x, out, scales, T): for t < T, s = max_k |x[t,k]| / 448 (1 for a zero row):
//     CODES 0: out[t,k] = bf16(e4m3(x[t,k] / s) * s) (bf16 [T, K]; may alias x): a W8A8
//     product's activations rounded per row for a bf16 GEMM (FMT 6 rounds them itself);
//     CODES 1: out[t,k] = e4m3(x[t,k] / s) (one byte each, [T, K]; must not alias x) and
//     scales[t] = s (f32): the operands of an FP8 GEMM with per-row scales.
//     One CTA per row.
//
// Layouts: x [M, K] bf16 row-major, 16-byte aligned; out [M, N] OutT; codes row-major with
// K % 16 == 0 (one byte per code: FMT 1, 5, 6) or K % 32 == 0 (int4: FMT 2 to 4), so every row starts 16-byte aligned; the last group
// of a row may be shorter than G (G need not divide K). 1 <= M <= 8, any N >= 1.
// Scheme (gemv_q): gemv_tc.cu's, with a 16-byte code vector per lane and row: a CTA owns 16
// weight rows (32 gated; 8 for the residual epilogue, the upper 8 A rows repeating the lower 8)
// and its 8 warps split K in chunks of 4·PER columns (PER = 16 int8 or 32 int4 codes per
// vector); in a chunk, lane (g = lane/4, t = lane%4) loads the vectors of rows g and g+8 at k
// offset PER·t and the same PER columns of x row g. The codes become bf16 pairs in registers
// (int8: byte -> f32 by the 2^23 magic number, exact; int4: two nibbles per 32-bit lane-op into
// bf16 128+q, exact, minus 128+zero, times the scale; FMT 4 and 5 scale each code in f32 and
// round once to bf16) and each 4 codes of a row feed one
// m16n8k16 MMA; the k order inside a vector is the same permutation for A and B (int4 pairs
// codes (j, j+4), so x pairs are rebuilt with byte permutes), which a dot product ignores.
// Codes stream with ld.global.nc.L1::no_allocate, L2 fetching 256-byte blocks; the first group
// is issued before kiln::pdl_sync(). NORM: after pdl_sync every CTA normalizes the x row into
// shared memory (K bf16) and the product reads x from there. Partial sums of the 8 warps meet in shared memory; warp 0
// applies the scale (int8) and the epilogue. Cost is independent of M.
// Launch: gemv_q grid (ceil(N / 16)), ceil(N / 8) for EPI 1, block GEMV_Q_WARPS*32 = 256;
// dequant grid (ceil(R * K / PER / 256)), block 256; act_fp8 grid (T), block 256. No dynamic
// shared memory.
#include "common.cuh"
#include <cuda_fp16.h>

// Tuning knobs (the launch code assumes the defaults): warps per CTA (splitting K), and chunks in
// flight per warp.
#ifndef GEMV_Q_WARPS
#define GEMV_Q_WARPS 8
#endif
#ifndef GEMV_Q_UNROLL
#define GEMV_Q_UNROLL 4
#endif
#define DEQUANT_THREADS 256

template <int FMT>
struct QFmt {
  static_assert(FMT >= 1 && FMT <= 6,
                "gemv_q: FMT is 1 (int8), 2 (int4), 3 (int4, zero points), 4 (int4, minimum), 5 (int8, "
                "groups) or 6 (fp8)");
  static constexpr bool BYTE = FMT == 1 || FMT == 5 || FMT == 6;  // one byte per code
  static constexpr int PER = BYTE ? 16 : 32;       // codes per 16-byte vector
  static constexpr int CH = 4 * PER;               // columns per chunk (4 lanes per row group)
  static constexpr int BYTES_PER_2 = BYTE ? 2 : 1;  // bytes per two codes
};

#define FP8_MAX 448.f

// Four bf16 values (pairs p0 = (x0, x1), p1 = (x2, x3), low halves first) times `inv`, rounded to
// E4M3 (nearest even, saturating to +-448), x0 in the low byte.
__device__ __forceinline__ unsigned gemv_q_e4m3x4(unsigned p0, unsigned p1, float inv) {
  const float2 a = kiln::bf2_to_f2(p0), b = kiln::bf2_to_f2(p1);
  unsigned short lo, hi;
  // cvt ... d, a, b puts a in the upper byte.
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(a.y * inv), "f"(a.x * inv));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(b.y * inv), "f"(b.x * inv));
  return (unsigned)lo | ((unsigned)hi << 16);
}

// The two E4M3 codes of bits 16h..16h+15 of w as an exact f16 pair (low half: the low byte).
__device__ __forceinline__ float2 gemv_q_e4m3x2_to_f2(unsigned w, int h) {
  const unsigned short c = (unsigned short)(w >> (16 * h));
  unsigned r;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(c));
  return __half22float2(*reinterpret_cast<__half2*>(&r));
}

// d += a · b  (m16n8k32, E4M3 inputs, f32 accumulators)
__device__ __forceinline__ void gemv_q_mma_fp8(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// max |v| over the M rows of K bf16 at x (row stride K, 16-byte aligned) by the whole CTA of
// NT threads; sx[m] = max / 448 (1 for a zero row). Ends with a barrier.
template <int K, int NT>
__device__ __forceinline__ void gemv_q_row_scales(const bf16* x, int M, float* sx, float (*red)[8]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int m = 0; m < M; ++m) {
    float a = 0.f;
    for (int i = threadIdx.x * 8; i < K; i += NT * 8) {
      float f[8];
      kiln::unpack8(*reinterpret_cast<const uint4*>(x + (long long)m * K + i), f);
#pragma unroll
      for (int j = 0; j < 8; ++j) a = fmaxf(a, fabsf(f[j]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    if (lane == 0) red[warp][m] = a;
  }
  __syncthreads();
  if (threadIdx.x < M) {
    float a = 0.f;
    for (int w = 0; w < NT / 32; ++w) a = fmaxf(a, red[w][threadIdx.x]);
    sx[threadIdx.x] = a > 0.f ? a / FP8_MAX : 1.f;
  }
  __syncthreads();
}

// Two int8 codes (bytes 2h, 2h+1 of w) as an exact bf16 pair (low half: byte 2h).
__device__ __forceinline__ unsigned gemv_q_i8pair(unsigned w, int h) {
  const unsigned u = w ^ 0x80808080u;  // code + 128, unsigned
  // Bytes (u_j, 0, 0, 0x4B): the float 2^23 + u_j.
  const float lo = __int_as_float(__byte_perm(u, 0x4B000000u, (2 * h) | 0x7440)) - 8388736.f;
  const float hi = __int_as_float(__byte_perm(u, 0x4B000000u, (2 * h + 1) | 0x7440)) - 8388736.f;
  return kiln::f2_to_bf2(lo, hi);
}

// gemv_q_i8pair scaled by `s` in f32, rounded once to bf16 (FMT 5).
__device__ __forceinline__ unsigned gemv_q_i8pair_scaled(unsigned w, int h, float s) {
  const unsigned u = w ^ 0x80808080u;
  const float lo = __int_as_float(__byte_perm(u, 0x4B000000u, (2 * h) | 0x7440)) - 8388736.f;
  const float hi = __int_as_float(__byte_perm(u, 0x4B000000u, (2 * h + 1) | 0x7440)) - 8388736.f;
  return kiln::f2_to_bf2(lo * s, hi * s);
}

// The four bf16 pairs of one 32-bit word of int4 codes e0..e7 (e0 in the low nibble):
// p[j] = ((e_j, e_{j+4}) - z) * s, j < 4; z2 = the pair (128 + zero), s2 = the scale pair.
__device__ __forceinline__ void gemv_q_i4pairs(unsigned w, bf162 z2, bf162 s2, unsigned (&p)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    unsigned v;
    // (w >> 4j) & 0x000F000F | 0x43004300: the bf16 pair (128 + e_j, 128 + e_{j+4}).
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(w >> (4 * j)), "r"(0x000F000Fu), "r"(0x43004300u));
    bf162 b = *reinterpret_cast<bf162*>(&v);
    b = __hmul2(__hsub2(b, z2), s2);
    p[j] = *reinterpret_cast<unsigned*>(&b);
  }
}

// Group `gi` of weight row `row` (FMT 2 to 5): its f16 scale bits, and in bits 16..31 the zero
// point (8 when symmetric; FMT 2, 3) or the f16 minimum's bits (FMT 4).
template <int K, int FMT, int G>
__device__ __forceinline__ unsigned gemv_q_group(const void* scale, const unsigned char* zero, long long row, int gi) {
  constexpr int GG = G > 0 ? G : 1;  // int8 (G = 0) has no groups
  constexpr int NG = (K + GG - 1) / GG;
  const unsigned bits = __ldg(reinterpret_cast<const unsigned short*>(scale) + row * NG + gi);
  const unsigned z = FMT == 3   ? (unsigned)__ldg(zero + row * NG + gi)
                     : FMT == 4 ? (unsigned)__ldg(reinterpret_cast<const unsigned short*>(zero) + row * NG + gi)
                                : 8u;
  return bits | (z << 16);
}

// The f16 at bits 16*i of a group word, as f32.
__device__ __forceinline__ float gemv_q_f16(unsigned sz, int i) {
  return __half2float(__ushort_as_half((unsigned short)(sz >> (16 * i))));
}

// FMT 4: the four bf16 pairs of one 32-bit word of int4 codes e0..e7, p[j] = (e_j, e_{j+4}) *
// s + m in f32 (the product exact), each rounded once to bf16.
__device__ __forceinline__ void gemv_q_i4pairs_min(unsigned w, float s, float m, unsigned (&p)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    unsigned v;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(w >> (4 * j)), "r"(0x000F000Fu), "r"(0x43004300u));
    const float lo = __uint_as_float(v << 16) - 128.f, hi = __uint_as_float(v & 0xFFFF0000u) - 128.f;
    p[j] = kiln::f2_to_bf2(fmaf(lo, s, m), fmaf(hi, s, m));
  }
}

// The (128 + zero) and scale pairs of a group from gemv_q_group's word.
__device__ __forceinline__ void gemv_q_unpack(unsigned sz, bf162& z2, bf162& s2) {
  s2 = __float2bfloat162_rn(__half2float(__ushort_as_half((unsigned short)(sz & 0xFFFF))));
  z2 = __float2bfloat162_rn((float)(128 + (sz >> 16)));
}

template <typename T> __device__ __forceinline__ T gemv_q_out(float v);
template <> __device__ __forceinline__ float gemv_q_out<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 gemv_q_out<bf16>(float v) { return __float2bfloat16_rn(v); }

// d += a · b  (m16n8k16, bf16 inputs, f32 accumulators)
__device__ __forceinline__ void gemv_q_mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                           unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned gemv_q_word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <int K, int EPI, int FMT, int G, int NORM, typename OutT>
__global__ void __launch_bounds__(GEMV_Q_WARPS * 32)
gemv_q(const bf16* __restrict__ x, int M, const unsigned char* __restrict__ q, const void* __restrict__ scale,
       const unsigned char* __restrict__ zero, int N, const bf16* residual, OutT* out,
       const bf16* __restrict__ norm_w, float eps) {
  typedef QFmt<FMT> F;
  constexpr int PER = F::PER, CH = F::CH;
  static_assert(K % PER == 0, "gemv_q: K must be a multiple of 16 (int8) or 32 (int4)");
  static_assert(EPI >= 0 && EPI <= 4,
                "gemv_q: EPI is 0 (plain), 1 (+residual), 2 (gated), 3 (+bias) or 4 (GeGLU)");
  constexpr bool GATED = EPI == 2 || EPI == 4;
  static_assert(FMT == 1 || FMT == 6 || (G == 32 || G == 64 || G == 128), "gemv_q: G is 32, 64 or 128");
  static_assert(NORM == 0 || NORM == 1, "gemv_q: NORM is 0 or 1 (M = 1)");
  constexpr int NC = (K + CH - 1) / CH;  // chunks
  constexpr long long RB = (long long)K * F::BYTES_PER_2 / 2;  // bytes per weight row
  constexpr int NA = GATED ? 2 : 1;      // A tiles: the rows, or gate and up rows
  constexpr int HR = EPI == 1 ? 1 : 2;   // distinct 8-row halves of the MMA's A tile
  constexpr int U = GEMV_Q_UNROLL;
  __shared__ float red[GEMV_Q_WARPS][NA * 4][32];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 8 * HR;
  long long row[NA][2];
#pragma unroll
  for (int a = 0; a < NA; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) row[a][h] = (long long)a * N + min(n0 + g + 8 * (h % HR), N - 1);
  const bool has_x = g < M;

  float acc[NA][4];
#pragma unroll
  for (int a = 0; a < NA; ++a) acc[a][0] = acc[a][1] = acc[a][2] = acc[a][3] = 0.f;

  uint4 wv[U][NA][2];
  unsigned sz[U][NA][2];  // int4: each vector's group scale and zero point (gemv_q_group)
  auto load_w = [&](int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * GEMV_Q_WARPS;
      const int k = c * CH + PER * t;
      if (c < NC) {
#pragma unroll
        for (int a = 0; a < NA; ++a)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (h >= HR) {
              wv[u][a][h] = wv[u][a][0];
              sz[u][a][h] = sz[u][a][0];
            } else if (k < K) {
              wv[u][a][h] = kiln::ld_stream16_256(q + row[a][h] * RB + (F::BYTE ? k : k / 2));
              if (FMT != 1 && FMT != 6) sz[u][a][h] = gemv_q_group<K, FMT, G>(scale, zero, row[a][h], k / (G > 0 ? G : 1));
            } else {
              wv[u][a][h] = make_uint4(0, 0, 0, 0);
              sz[u][a][h] = 0;
            }
          }
      }
    }
  };
  load_w(warp);
  kiln::pdl_sync();
  __shared__ __align__(16) bf16 xs[NORM ? K : 8];
  if (NORM) {
    __shared__ float red[32];
    kiln::rms_row_to_smem<K, GEMV_Q_WARPS * 32>(x, norm_w, eps, xs, red);
  }
  // FMT 6: each row's activation scale (quant.rs's fp8_rows), and the lane's reciprocal.
  __shared__ float sx[8];
  float inv_sx = 0.f;
  if (FMT == 6) {
    __shared__ float amax[GEMV_Q_WARPS][8];
    gemv_q_row_scales<K, GEMV_Q_WARPS * 32>(NORM ? xs : x, M, sx, amax);
    inv_sx = has_x ? 1.f / sx[g] : 0.f;
  }
  const bf16* xp = (NORM ? xs : x + (long long)(has_x ? g : 0) * K) + PER * t;
  for (int c0 = warp; c0 < NC; c0 += GEMV_Q_WARPS * U) {
    if (c0 != warp) load_w(c0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * GEMV_Q_WARPS;
      if (c >= NC) continue;
      const int k = c * CH + PER * t;
      const bool live = has_x && k < K;  // columns past K: x is zero, so the codes do not count
      unsigned xw[PER / 2];
#pragma unroll
      for (int v = 0; v < PER / 8; ++v) {
        const bf16* xv_p = xp + c * CH + 8 * v;
        const uint4 xv = !live ? make_uint4(0, 0, 0, 0)
                         : NORM ? *reinterpret_cast<const uint4*>(xv_p)
                                : kiln::ld_cached16(xv_p);
        xw[4 * v] = xv.x;
        xw[4 * v + 1] = xv.y;
        xw[4 * v + 2] = xv.z;
        xw[4 * v + 3] = xv.w;
      }
      unsigned xq[4];  // FMT 6: the 16 x values as E4M3 codes, 4 per word in k order
      if (FMT == 6) {
#pragma unroll
        for (int w = 0; w < 4; ++w) xq[w] = gemv_q_e4m3x4(xw[2 * w], xw[2 * w + 1], inv_sx);
      }
#pragma unroll
      for (int a = 0; a < NA; ++a) {
        if (FMT == 6) {
          // Words 2j, 2j+1 of a row's vector are the MMA's k slots 4t.. and 16+4t.. (a0/a2 row g,
          // a1/a3 row g+8); x's words 2j, 2j+1 the same slots of B.
#pragma unroll
          for (int j = 0; j < 2; ++j)
            gemv_q_mma_fp8(acc[a], gemv_q_word(wv[u][a][0], 2 * j), gemv_q_word(wv[u][a][1], 2 * j),
                           gemv_q_word(wv[u][a][0], 2 * j + 1), gemv_q_word(wv[u][a][1], 2 * j + 1), xq[2 * j],
                           xq[2 * j + 1]);
        } else if (F::BYTE) {
          // Word i holds codes 4i..4i+3: pairs (4i, 4i+1) and (4i+2, 4i+3), x words 2i and 2i+1.
          const float s0 = FMT == 5 ? gemv_q_f16(sz[u][a][0], 0) : 1.f;
          const float s1 = FMT == 5 ? gemv_q_f16(sz[u][a][1], 0) : 1.f;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const unsigned w0 = gemv_q_word(wv[u][a][0], i), w1 = gemv_q_word(wv[u][a][1], i);
            if (FMT == 1)
              gemv_q_mma(acc[a], gemv_q_i8pair(w0, 0), gemv_q_i8pair(w1, 0), gemv_q_i8pair(w0, 1),
                         gemv_q_i8pair(w1, 1), xw[2 * i], xw[2 * i + 1]);
            else
              gemv_q_mma(acc[a], gemv_q_i8pair_scaled(w0, 0, s0), gemv_q_i8pair_scaled(w1, 0, s1),
                         gemv_q_i8pair_scaled(w0, 1, s0), gemv_q_i8pair_scaled(w1, 1, s1), xw[2 * i],
                         xw[2 * i + 1]);
          }
        } else {
          bf162 z2[2], s2[2];
          float sf[2], mf[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (FMT == 4) {
              sf[h] = gemv_q_f16(sz[u][a][h], 0);
              mf[h] = gemv_q_f16(sz[u][a][h], 1);
            } else {
              gemv_q_unpack(sz[u][a][h], z2[h], s2[h]);
            }
          }
          // Word i holds codes 8i..8i+7, paired (8i+j, 8i+j+4); x words 4i..4i+3 hold the x pairs
          // (8i, 8i+1) .. (8i+6, 8i+7), re-paired to match with byte permutes.
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            unsigned p0[4], p1[4];
            if (FMT == 4) {
              gemv_q_i4pairs_min(gemv_q_word(wv[u][a][0], i), sf[0], mf[0], p0);
              gemv_q_i4pairs_min(gemv_q_word(wv[u][a][1], i), sf[1], mf[1], p1);
            } else {
              gemv_q_i4pairs(gemv_q_word(wv[u][a][0], i), z2[0], s2[0], p0);
              gemv_q_i4pairs(gemv_q_word(wv[u][a][1], i), z2[1], s2[1], p1);
            }
            const unsigned x0 = xw[4 * i], x1 = xw[4 * i + 1], x2 = xw[4 * i + 2], x3 = xw[4 * i + 3];
            const unsigned b0 = __byte_perm(x0, x2, 0x5410), b1 = __byte_perm(x0, x2, 0x7632);
            const unsigned b2 = __byte_perm(x1, x3, 0x5410), b3 = __byte_perm(x1, x3, 0x7632);
            gemv_q_mma(acc[a], p0[0], p1[0], p0[1], p1[1], b0, b1);
            gemv_q_mma(acc[a], p0[2], p1[2], p0[3], p1[3], b2, b3);
          }
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
      for (int ww = 0; ww < GEMV_Q_WARPS; ++ww) s += red[ww][a * 4 + i][lane];
      acc[a][i] = s;
    }
  // acc[a][i]: weight row n0 + g + 8*(i/2), batch row 2t + (i%2) (with HR = 1, i/2 = 1 repeats
  // i/2 = 0: skipped, as the residual may alias out).
#pragma unroll
  for (int i = 0; i < 2 * HR; ++i) {
    const int n = n0 + g + 8 * (i >> 1);
    const int m = 2 * t + (i & 1);
    if (n < N && m < M) {
      float r[NA];
#pragma unroll
      for (int a = 0; a < NA; ++a) {
        r[a] = acc[a][i];
        if (FMT == 1) r[a] *= __ldg(reinterpret_cast<const float*>(scale) + (long long)a * N + n);
        if (FMT == 6) r[a] *= __ldg(reinterpret_cast<const float*>(scale) + (long long)a * N + n) * sx[m];
      }
      float v;
      if (GATED) {
        v = kiln::gate_act<EPI == 4>(r[0]) * r[NA - 1];
      } else {
        v = r[0];
        if (EPI == 1) v += __bfloat162float(residual[(long long)m * N + n]);
        if (EPI == 3) v += __bfloat162float(residual[n]);
      }
      out[(long long)m * N + n] = gemv_q_out<OutT>(v);
    }
  }
}

template <int K, int FMT, int G>
__global__ void __launch_bounds__(DEQUANT_THREADS)
dequant(const unsigned char* __restrict__ q, const void* __restrict__ scale, const unsigned char* __restrict__ zero,
        int R, bf16* __restrict__ out) {
  typedef QFmt<FMT> F;
  constexpr int PER = F::PER;
  static_assert(K % PER == 0, "dequant: K must be a multiple of 16 (int8) or 32 (int4)");
  constexpr int VR = K / PER;  // code vectors per row
  constexpr long long RB = (long long)K * F::BYTES_PER_2 / 2;  // bytes per weight row
  const long long v = (long long)blockIdx.x * DEQUANT_THREADS + threadIdx.x;
  const long long r = v / VR;
  const int k = (int)(v - r * VR) * PER;
  const bool ok = r < R;
  const uint4 c = ok ? kiln::ld_stream16(q + r * RB + (F::BYTE ? k : k / 2)) : make_uint4(0, 0, 0, 0);
  // `out` may still be read by the previous GEMM: write only after it completes.
  kiln::pdl_sync();
  if (!ok) return;
  uint4* dst = reinterpret_cast<uint4*>(out + r * K + k);
  if (FMT == 6) {
    const float s = __ldg(reinterpret_cast<const float*>(scale) + r);
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 8 codes (two words) per 16-byte output vector
      float f[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 v = gemv_q_e4m3x2_to_f2(gemv_q_word(c, 2 * i + j / 2), j % 2);
        f[2 * j] = v.x * s;
        f[2 * j + 1] = v.y * s;
      }
      dst[i] = kiln::pack8(f);
    }
  } else if (F::BYTE) {
    const float s = FMT == 1 ? __ldg(reinterpret_cast<const float*>(scale) + r)
                             : gemv_q_f16(gemv_q_group<K, FMT, G>(scale, zero, r, k / (G > 0 ? G : 1)), 0);
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 8 codes (two words) per 16-byte output vector
      float f[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const unsigned w = gemv_q_word(c, 2 * i + j / 4);
        f[j] = (float)(signed char)((w >> (8 * (j % 4))) & 0xFF) * s;
      }
      dst[i] = kiln::pack8(f);
    }
  } else {
    bf162 z2, s2;
    const unsigned sz = gemv_q_group<K, FMT, G>(scale, zero, r, k / (G > 0 ? G : 1));
    gemv_q_unpack(sz, z2, s2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: codes 8i..8i+7, one 16-byte output vector
      unsigned p[4];
      if (FMT == 4)
        gemv_q_i4pairs_min(gemv_q_word(c, i), gemv_q_f16(sz, 0), gemv_q_f16(sz, 1), p);
      else
        gemv_q_i4pairs(gemv_q_word(c, i), z2, s2, p);
      // p[j] = (e_j, e_{j+4}): back to column order (e0, e1), (e2, e3), ...
      uint4 o;
      o.x = __byte_perm(p[0], p[1], 0x5410);
      o.y = __byte_perm(p[2], p[3], 0x5410);
      o.z = __byte_perm(p[0], p[1], 0x7632);
      o.w = __byte_perm(p[2], p[3], 0x7632);
      dst[i] = o;
    }
  }
}

template <int K, int CODES>
__global__ void __launch_bounds__(DEQUANT_THREADS) act_fp8(const bf16* x, void* out, float* scales, int T) {
  static_assert(K % 8 == 0, "act_fp8: K must be a multiple of 8");
  constexpr int V = (K / 8 + DEQUANT_THREADS - 1) / DEQUANT_THREADS;  // 8-value vectors per thread
  __shared__ float amax[DEQUANT_THREADS / 32][8];
  __shared__ float sx[8];
  const int t = blockIdx.x;
  kiln::pdl_sync();
  if (t >= T) return;
  const bf16* xr = x + (long long)t * K;
  uint4 v[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int k = (i * DEQUANT_THREADS + threadIdx.x) * 8;
    v[i] = k < K ? *reinterpret_cast<const uint4*>(xr + k) : make_uint4(0, 0, 0, 0);
  }
  gemv_q_row_scales<K, DEQUANT_THREADS>(xr, 1, sx, amax);
  const float s = sx[0], inv = 1.f / s;
  if (CODES && threadIdx.x == 0) scales[t] = s;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int k = (i * DEQUANT_THREADS + threadIdx.x) * 8;
    if (k >= K) continue;
    const unsigned c0 = gemv_q_e4m3x4(v[i].x, v[i].y, inv), c1 = gemv_q_e4m3x4(v[i].z, v[i].w, inv);
    if (CODES) {
      *reinterpret_cast<uint2*>(static_cast<unsigned char*>(out) + (long long)t * K + k) = make_uint2(c0, c1);
      continue;
    }
    float f[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = gemv_q_e4m3x2_to_f2(j < 2 ? c0 : c1, j % 2);
      f[2 * j] = a.x * s;
      f[2 * j + 1] = a.y * s;
    }
    *reinterpret_cast<uint4*>(static_cast<bf16*>(out) + (long long)t * K + k) = kiln::pack8(f);
  }
}
