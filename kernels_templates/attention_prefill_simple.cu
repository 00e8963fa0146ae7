// attention_prefill_simple.cu — causal prefill attention on CUDA cores: the portable fallback
// and cross-check of attention_prefill.cu (same signature, same semantics, any HEAD_DIM % 32 == 0).
//
//   attention_prefill_simple<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(qkv, k_cache, v_cache,
//       block_tables, max_blocks, seq_lens, query_start, out, B, scale, window)
//     query i of sequence b (q_len = query_start[b+1] - query_start[b], L = seq_lens[b]) sits at
//     position p = L - q_len + i and attends to cached keys 0 ..= p (p - window + 1 ..= p with a
//     sliding window, window > 0):
//       out[query_start[b] + i, h, :] = softmax_j(scale * q_i·k_j) · v_j,  kv head h/(HEADS/KV_HEADS)
//
// Layouts as attention_prefill.cu: qkv [T, (HEADS+2*KV_HEADS)*HEAD_DIM]; caches
// [num_blocks, BLOCK, KV_HEADS, HEAD_DIM]; block_tables [B, max_blocks]; out [T, HEADS*HEAD_DIM].
// Scheme: a CTA owns PFS_Q = 32 query rows of one (sequence, head); 4 threads per row, each with a
// quarter of the head dims in registers; K/V tiles of PFS_KT = 16 keys staged in shared memory;
// online softmax in f32 (log2 units).
// Launch: grid (HEADS, ceil(Q / 32), B), Q the longest q_len (tile order: kiln::prefill_tile),
// block PFS_THREADS (128), no dynamic shared memory.
#include "common.cuh"

#define PFS_THREADS 128
#define PFS_Q 32
#define PFS_KT 16

template <int HEADS, int KV_HEADS, int HEAD_DIM, int BLOCK>
__global__ void __launch_bounds__(PFS_THREADS)
attention_prefill_simple(const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
                         const bf16* __restrict__ v_cache, const int* __restrict__ block_tables,
                         int max_blocks, const int* __restrict__ seq_lens,
                         const int* __restrict__ query_start, bf16* __restrict__ out, int B, float scale,
                         int window) {
  kiln::pdl_sync();
  static_assert(HEAD_DIM % 32 == 0, "attention_prefill_simple: HEAD_DIM must be a multiple of 32");
  static_assert(HEADS % KV_HEADS == 0, "attention_prefill_simple: HEADS must be a multiple of KV_HEADS");
  constexpr int D = HEAD_DIM;
  constexpr int DP = D / 4;  // dims per thread
  constexpr int STRIDE = (HEADS + 2 * KV_HEADS) * D;
  constexpr int KVROW = KV_HEADS * D;
  constexpr float LOG2E = 1.4426950408889634f;
  __shared__ __align__(16) bf16 sK[PFS_KT * D];
  __shared__ __align__(16) bf16 sV[PFS_KT * D];

  kiln::PrefillTile tile;
  if (!kiln::prefill_tile(PFS_Q, query_start, seq_lens, B, tile)) return;
  const int b = tile.b, h = tile.h, qs = tile.qs, q_len = tile.q_len, q0 = tile.q0, L = tile.L;
  const int past = tile.past;
  const int kvh = h / (HEADS / KV_HEADS);
  const int tid = threadIdx.x, row = tid >> 2, part = tid & 3;
  const bool row_valid = q0 + row < q_len;
  const int qpos = past + q0 + row;
  const int kv_end = min(L, past + min(q0 + PFS_Q, q_len));
  const int* bt = block_tables + (long long)b * max_blocks;

  float q[DP], o[DP];
  {
    const bf16* src = qkv + (long long)(qs + (row_valid ? q0 + row : 0)) * STRIDE + h * D + part * DP;
    const float sl2 = scale * LOG2E;
#pragma unroll
    for (int v = 0; v < DP / 8; ++v) {
      kiln::unpack8(kiln::ld_cached16(src + v * 8), q + v * 8);
    }
#pragma unroll
    for (int d = 0; d < DP; ++d) { q[d] *= sl2; o[d] = 0.f; }
  }
  float m_run = kiln::neg_inf(), l_run = 0.f;

  // With a window, tiles before the first row's first key are skipped.
  const int kv_begin = window > 0 ? max(0, past + q0 - window + 1) / PFS_KT * PFS_KT : 0;
  for (int k0 = kv_begin; k0 < kv_end; k0 += PFS_KT) {
    for (int idx = tid; idx < PFS_KT * D / 8; idx += PFS_THREADS) {
      const int r = idx / (D / 8), c = idx % (D / 8);
      const int pos = k0 + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (pos < kv_end) {
        const long long off = ((long long)bt[pos / BLOCK] * BLOCK + pos % BLOCK) * KVROW + kvh * D + c * 8;
        kv = kiln::ld_cached16(k_cache + off);
        vv = kiln::ld_cached16(v_cache + off);
      }
      reinterpret_cast<uint4*>(sK)[idx] = kv;
      reinterpret_cast<uint4*>(sV)[idx] = vv;
    }
    __syncthreads();
    float s[PFS_KT];
    float mx = kiln::neg_inf();
#pragma unroll
    for (int j = 0; j < PFS_KT; ++j) {
      const bf16* kr = sK + j * D + part * DP;
      float acc = 0.f;
#pragma unroll
      for (int v = 0; v < DP / 8; ++v) {
        float kf[8];
        kiln::unpack8(reinterpret_cast<const uint4*>(kr)[v], kf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(q[v * 8 + e], kf[e], acc);
      }
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      const int key = k0 + j;
      s[j] = (key <= qpos && key < kv_end && (window <= 0 || key > qpos - window)) ? acc : kiln::neg_inf();
      mx = fmaxf(mx, s[j]);
    }
    const float m_new = fmaxf(m_run, mx);
    const float m_use = m_new == kiln::neg_inf() ? 0.f : m_new;
    const float alpha = exp2f(m_run - m_use);
    m_run = m_new;
    l_run *= alpha;
#pragma unroll
    for (int d = 0; d < DP; ++d) o[d] *= alpha;
#pragma unroll
    for (int j = 0; j < PFS_KT; ++j) {
      const float p = exp2f(s[j] - m_use);
      l_run += p;
      const bf16* vr = sV + j * D + part * DP;
#pragma unroll
      for (int v = 0; v < DP / 8; ++v) {
        float vf[8];
        kiln::unpack8(reinterpret_cast<const uint4*>(vr)[v], vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) o[v * 8 + e] = fmaf(p, vf[e], o[v * 8 + e]);
      }
    }
    __syncthreads();
  }
  if (row_valid) {
    const float inv = l_run > 0.f ? 1.f / l_run : 0.f;
    bf16* dst = out + (long long)(qs + q0 + row) * (HEADS * D) + h * D + part * DP;
#pragma unroll
    for (int v = 0; v < DP / 8; ++v) {
      float f[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = o[v * 8 + e] * inv;
      reinterpret_cast<uint4*>(dst)[v] = kiln::pack8(f);
    }
  }
}
