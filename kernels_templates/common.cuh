// common.cuh — helpers shared by every kiln kernel template (included as "common.cuh"; the
// codegen hands it to NVRTC as an in-memory header, so no file lookup happens at build time).
//
// Contents: the bf16 type alias, 16-byte vector loads (read-only, no L1 allocation for streamed
// weights), bf16x8 <-> float conversions, warp and block reductions, cp.async copies into shared
// memory, the online-softmax row update and the query-tile prologue of the prefill attention
// kernels, the ordered-key mapping of floats used by the samplers, and the
// programmatic-dependent-launch hooks. Everything is __device__ and header-only; nothing here is a
// kernel.
// Conventions of all templates: activations and weights are bf16 row-major, accumulation is f32,
// compile-time dimensions are template parameters, runtime sizes are arguments, and every kernel
// bounds-checks its runtime sizes so any T/B/length is valid (CUDA-graph capturable: no host
// synchronization, no allocation).
// Programmatic dependent launch: the executor launches every kernel allowed to start while the
// previous one in the stream drains, so every kernel calls kiln::pdl_sync() before its first read
// of anything a previous kernel writes (activations, KV cache, sampled tokens) and before its
// first global write; only weights and the step's metadata arrays (positions, slots, lengths,
// block tables: written by the host before the step's first launch) may be read before it.
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

namespace kiln {

// Waits until the previous kernel in the stream has completed and its writes are visible, then
// lets the next kernel launch (its blocks fill SMs as this grid's retire and wait in their own
// pdl_sync, having issued their weight loads). A no-op below sm_90 and when the launch carried no
// programmatic-serialization attribute.
__device__ __forceinline__ void pdl_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// -infinity without <cmath> (NVRTC has no standard headers).
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 16-byte read-only load that does not allocate in L1 (weights, streamed exactly once), with an
// optional L2 qualifier.
#define KILN_LD_STREAM16(qual, p, r)                                                        \
  asm volatile("ld.global.nc.L1::no_allocate" qual ".v4.u32 {%0, %1, %2, %3}, [%4];"       \
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)                                 \
               : "l"(p))

__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  KILN_LD_STREAM16("", p, r);
  return r;
}

// ld_stream16 with L2 fetching 256-byte blocks (.L2::256B): gemv_tc, whose lanes read 16 bytes
// of two rows per 32-wide k chunk, measured 2–5% faster with it; the M = 1 gemv, whose warps read
// 512 contiguous bytes per row, was unchanged.
__device__ __forceinline__ uint4 ld_stream16_256(const void* p) {
  uint4 r;
  KILN_LD_STREAM16(".L2::256B", p, r);
  return r;
}

// 16-byte read-only load through L1 (activations that many warps re-read).
__device__ __forceinline__ uint4 ld_cached16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ float2 bf2_to_f2(unsigned int v) {
  bf162 h = *reinterpret_cast<bf162*>(&v);
  return __bfloat1622float2(h);
}

__device__ __forceinline__ unsigned int f2_to_bf2(float a, float b) {
  bf162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<unsigned int*>(&h);
}

// The gate activation of a gated MLP (GEMV epilogues EPI 2 and 4, silu_mul and gelu_mul):
// ACT 0 SiLU g·σ(g); ACT 1 GELU's tanh approximation g·σ(2√(2/π)·(g + 0.044715·g³)).
template <int ACT>
__device__ __forceinline__ float gate_act(float g) {
  const float z = ACT == 0 ? g : 1.5957691216057308f * (g + 0.044715f * (g * g * g));
  return g / (1.f + __expf(-z));
}

// Unpack 8 bf16 (one uint4) into floats.
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
  float2 a = bf2_to_f2(v.x), b = bf2_to_f2(v.y), c = bf2_to_f2(v.z), d = bf2_to_f2(v.w);
  f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
  f[4] = c.x; f[5] = c.y; f[6] = d.x; f[7] = d.y;
}

// Pack 8 floats into 8 bf16 (round to nearest even).
__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 v;
  v.x = f2_to_bf2(f[0], f[1]);
  v.y = f2_to_bf2(f[2], f[3]);
  v.z = f2_to_bf2(f[4], f[5]);
  v.w = f2_to_bf2(f[6], f[7]);
  return v;
}

// Dot product of 8 bf16 pairs, accumulated in f32.
__device__ __forceinline__ float dot8(uint4 a, uint4 b, float acc) {
  float2 a0 = bf2_to_f2(a.x), b0 = bf2_to_f2(b.x);
  float2 a1 = bf2_to_f2(a.y), b1 = bf2_to_f2(b.y);
  float2 a2 = bf2_to_f2(a.z), b2 = bf2_to_f2(b.z);
  float2 a3 = bf2_to_f2(a.w), b3 = bf2_to_f2(b.w);
  acc = fmaf(a0.x, b0.x, acc); acc = fmaf(a0.y, b0.y, acc);
  acc = fmaf(a1.x, b1.x, acc); acc = fmaf(a1.y, b1.y, acc);
  acc = fmaf(a2.x, b2.x, acc); acc = fmaf(a2.y, b2.y, acc);
  acc = fmaf(a3.x, b3.x, acc); acc = fmaf(a3.y, b3.y, acc);
  return acc;
}

// RoPE's (sin, cos) for pair index i at position pos, in f32 as HF computes them: angle =
// pos * inv_freq[i] (accurate sincosf), inv_freq [HEAD_DIM / 2] f32 being the table the model
// file computes (plain 1 / theta^(2i / HEAD_DIM), or scaled). rope_append and attention_decode
// both use it, so prefill and decode rotate a position identically.
__device__ __forceinline__ void rope_sincos(int pos, int i, const float* __restrict__ inv_freq,
                                            float* s, float* c) {
  sincosf((float)pos * inv_freq[i], s, c);
}

// RMSNorm of 8 elements of a row whose scale r = rsqrt(mean(x²) + eps) is known:
// bf16(w · bf16(x · r)), as HF LlamaRMSNorm rounds (normalize in f32, cast, times the weight).
__device__ __forceinline__ uint4 rms_apply8(uint4 x, uint4 w, float r) {
  float xf[8], wf[8];
  unpack8(x, xf);
  unpack8(w, wf);
#pragma unroll
  for (int j = 0; j < 8; ++j) xf[j] = wf[j] * __bfloat162float(__float2bfloat16_rn(xf[j] * r));
  return pack8(xf);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32
// floats of shared memory. Every thread gets the result. Contains __syncthreads().
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

// RMS-normalizes one row x [K] (bf16) into shared memory xs [K] with weight w [K], rounding as
// rms_apply8 does: the norm a GEMV folds into its prologue (gemv.cu, gemv_q.cu). Every one of
// the block's THREADS threads must call it (block-wide sum); xs is complete on return.
// `red` is [32] floats of shared scratch. K % 8 == 0, x, w and xs 16-byte aligned.
template <int K, int THREADS>
__device__ __forceinline__ void rms_row_to_smem(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                float eps, bf16* xs, float* red) {
  constexpr int NV = K / 8, PER = (NV + THREADS - 1) / THREADS;
  uint4 xr[PER];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int v = threadIdx.x + i * THREADS;
    if (v < NV) {
      float f[8];
      xr[i] = ld_cached16(x + v * 8);
      unpack8(xr[i], f);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss = fmaf(f[j], f[j], ss);
    }
  }
  const float r = rsqrtf(block_sum(ss, red) * (1.0f / K) + eps);
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int v = threadIdx.x + i * THREADS;
    if (v < NV) reinterpret_cast<uint4*>(xs)[v] = rms_apply8(xr[i], ld_cached16(w + v * 8), r);
  }
  __syncthreads();
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : neg_inf();
  return warp_max(v);
}

// Shared-memory address (for PTX operands) of a pointer into shared memory.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy (cp.async, L2 only); when !valid the destination is zero-filled
// and nothing is read.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed cp.async groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// 2^x on the special-function unit with subnormal results flushed to zero (softmax weights: no
// denormal fix-up around the MUFU instruction, which exp2f adds).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Online-softmax update of one score row spread over the 4 lanes of an MMA quad (the m16n8
// accumulator layout), with the running max kept in raw score units: `mx` is this lane's max of
// the row's new (masked) scores; m_run is the reference max; alpha is the factor the row's
// earlier sums and outputs are rescaled by; msc is the offset for p = 2^(s * sl2 + msc), where
// sl2 = scale * log2(e). The reference max is lazy (FlashAttention-4's conditional rescaling): it
// moves only when a score exceeds it by more than 8 in log2 units, so most tiles keep alpha = 1
// and the kernels skip rescaling O; the weights stay below 2^8, far inside f32 and bf16 range,
// and O / l is the same. A row with every score masked so far keeps alpha = 1 and p = 0.
__device__ __forceinline__ void quad_softmax_update(float mx, float sl2, float& m_run, float& alpha,
                                                    float& msc) {
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  // Also taken from -inf to a first finite max (alpha = 0); not from -inf to -inf (NaN).
  if ((mx - m_run) * sl2 > 8.f) {
    alpha = exp2_ftz((m_run - mx) * sl2);
    m_run = mx;
  } else {
    alpha = 1.f;
  }
  msc = m_run == neg_inf() ? 0.f : -m_run * sl2;
}

// The query tile of a prefill attention CTA. Grid (HEADS, tiles, B): blockIdx.x is the q head and
// blockIdx.y counts the sequence's tiles of `rows` queries from the last one down. The last tile
// attends to the most keys, and the hardware starts blocks in x-fastest order, so the longest
// tiles of every head start first and the short ones fill the SMs at the end (with the tile index
// fastest, the long tiles of the last heads started last and a quarter of the SM time was idle
// tail at T = 2048). Returns false when the tile lies past the sequence's queries.
struct PrefillTile {
  int b, h;       // sequence, q head
  int qs, q_len;  // the sequence's first packed query row, its number of queries
  int q0;         // the tile's first query, relative to qs
  int L, past;    // KV length after this step's append; position of query 0 (L - q_len)
};
__device__ __forceinline__ bool prefill_tile(int rows, const int* query_start, const int* seq_lens, int B,
                                             PrefillTile& t) {
  t.b = blockIdx.z;
  t.h = blockIdx.x;
  if (t.b >= B) return false;
  t.qs = query_start[t.b];
  t.q_len = query_start[t.b + 1] - t.qs;
  t.q0 = (int)(gridDim.y - 1 - blockIdx.y) * rows;
  if (t.q0 >= t.q_len) return false;
  t.L = seq_lens[t.b];
  t.past = t.L - t.q_len;
  return true;
}

// Monotone map of a float to an unsigned key: a < b  <=>  key(a) < key(b) (NaN sorts last).
__device__ __forceinline__ unsigned int float_key(float f) {
  unsigned int u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace kiln
