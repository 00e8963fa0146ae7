// attention_decode.cu — decode attention over the paged KV cache: one new token per sequence,
// GQA without repeating K/V, split-KV ("flash-decoding") with a log-sum-exp merge.
//
//   attention_decode<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(qkv, k_cache, v_cache, block_tables,
//       max_blocks, seq_lens, out, B, scale, partial_o, partial_ml, max_splits)
//     For sequence b < B with L = seq_lens[b] cached tokens (this step's token included, already
//     appended by rope_append) and q head h (kv head h / (HEADS/KV_HEADS)):
//       out[b, h, :] = softmax_j(scale * q·k_j) · v_j  over j < L
//     q is row b of qkv ([B, (HEADS+2*KV_HEADS)*HEAD_DIM], already rotated).
//   attention_decode_merge<HEADS, HEAD_DIM>(partial_o, partial_ml, seq_lens, out, B, max_splits)
//     Combines the splits of each (b, h) by log-sum-exp.
//
// Layouts: k_cache, v_cache [num_blocks, BLOCK, KV_HEADS, HEAD_DIM] bf16; block_tables
// [B, max_blocks] int32 (token position p lives in slot block_tables[b, p / BLOCK] * BLOCK +
// p % BLOCK); seq_lens [B] int32; out [B, HEADS * HEAD_DIM] bf16.
// Work split: grid (max_splits, KV_HEADS, B). A CTA serves the whole q-head group of its kv head
// (K/V read once per group, the FlashInfer layout) over the token range
// [split * chunk, min(L, (split + 1) * chunk)), chunk = decode_chunk(L, max_splits) (a multiple of
// DEC_TILE = 64); CTAs whose range is empty exit at once, so size max_splits for the longest
// context and let short sequences use fewer splits.
//   max_splits == 1: the kernel writes out directly; partial_o/partial_ml are not touched (may be null).
//   max_splits  > 1: the kernel writes f32 workspace, then attention_decode_merge writes out:
//     partial_o  [B, HEADS, max_splits, HEAD_DIM]  unnormalized sum_j p_j v_j of the split
//     partial_ml [B, HEADS, max_splits, 2]         (running max m in log2 units, sum l of 2^(s-m))
// A sequence with L == 0 gets a zero output row.
// Launch: attention_decode grid (max_splits, KV_HEADS, B), block DEC_THREADS (128);
//         attention_decode_merge grid (HEADS, B), block HEAD_DIM. No dynamic shared memory.
#include "common.cuh"

#define DEC_THREADS 128
#define DEC_TILE 64

// Tokens per split for a sequence of L tokens: at least one tile, a multiple of DEC_TILE.
__device__ __forceinline__ int decode_chunk(int L, int max_splits) {
  int c = (L + max_splits - 1) / max_splits;
  c = (c + DEC_TILE - 1) / DEC_TILE * DEC_TILE;
  return c < DEC_TILE ? DEC_TILE : c;
}

template <int HEADS, int KV_HEADS, int HEAD_DIM, int BLOCK>
__global__ void __launch_bounds__(DEC_THREADS)
attention_decode(const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
                 const bf16* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks,
                 const int* __restrict__ seq_lens, bf16* __restrict__ out, int B, float scale,
                 float* __restrict__ partial_o, float* __restrict__ partial_ml, int max_splits) {
  static_assert(HEADS % KV_HEADS == 0, "attention_decode: HEADS must be a multiple of KV_HEADS");
  static_assert(HEAD_DIM % 8 == 0 && 32 % (HEAD_DIM / 8) == 0 && HEAD_DIM <= 256,
                "attention_decode: HEAD_DIM / 8 must divide 32");
  constexpr int GROUP = HEADS / KV_HEADS;
  constexpr int VPR = HEAD_DIM / 8;         // 16-byte vectors per K/V row
  constexpr int TPR = DEC_THREADS / VPR;    // token rows per pass
  constexpr int PASSES = DEC_TILE / TPR;    // passes per tile
  constexpr int STRIDE = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
  constexpr int KVROW = KV_HEADS * HEAD_DIM;
  constexpr float LOG2E = 1.4426950408889634f;

  __shared__ float s_p[GROUP][DEC_TILE];    // scores, then probabilities
  __shared__ float s_alpha[GROUP];
  __shared__ float s_red[TPR][HEAD_DIM + 4];

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  if (b >= B) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int dv = tid % VPR, tl = tid / VPR;
  const int L = seq_lens[b];
  const int chunk = decode_chunk(L, max_splits);
  const int start = split * chunk;
  const int end = min(L, start + chunk);

  if (start >= end) {
    if (max_splits == 1 && split == 0) {  // L == 0: a zero row
      for (int e = tid; e < GROUP * HEAD_DIM; e += DEC_THREADS)
        out[(long long)b * HEADS * HEAD_DIM + kvh * GROUP * HEAD_DIM + e] = __float2bfloat16_rn(0.f);
    }
    return;
  }

  // This thread's slice of every q head of the group, pre-scaled into log2 units.
  float q[GROUP][8];
  {
    const bf16* qrow = qkv + (long long)b * STRIDE + kvh * GROUP * HEAD_DIM + dv * 8;
    const float qs = scale * LOG2E;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      kiln::unpack8(kiln::ld_cached16(qrow + g * HEAD_DIM), q[g]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] *= qs;
    }
  }
  float o[GROUP][8];
#pragma unroll
  for (int g = 0; g < GROUP; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) o[g][e] = 0.f;
  // Running max (log2 units) and sum of each head: updated by the warp that owns the head.
  __shared__ float s_m[GROUP], s_l[GROUP];
  if (tid < GROUP) { s_m[tid] = kiln::neg_inf(); s_l[tid] = 0.f; }
  __syncthreads();

  const int* bt = block_tables + (long long)b * max_blocks;
  const long long head_off = (long long)kvh * HEAD_DIM + dv * 8;

  for (int ts = start; ts < end; ts += DEC_TILE) {
    // Issue every K and V load of the tile before using any.
    uint4 kv[PASSES], vv[PASSES];
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      const int pos = ts + p * TPR + tl;
      if (pos < end) {
        const long long slot = (long long)bt[pos / BLOCK] * BLOCK + pos % BLOCK;
        kv[p] = kiln::ld_cached16(k_cache + slot * KVROW + head_off);
        vv[p] = kiln::ld_cached16(v_cache + slot * KVROW + head_off);
      } else {
        kv[p] = make_uint4(0, 0, 0, 0);
        vv[p] = make_uint4(0, 0, 0, 0);
      }
    }
    // Scores: the VPR lanes of a token row reduce their partial dot products.
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      float kf[8];
      kiln::unpack8(kv[p], kf);
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) s = fmaf(q[g][e], kf[e], s);
#pragma unroll
        for (int off = VPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        const int j = p * TPR + tl;
        if (dv == 0) s_p[g][j] = (ts + j < end) ? s : kiln::neg_inf();
      }
    }
    __syncthreads();
    // Online softmax: warp w owns heads w, w+4, ...; each lane holds DEC_TILE/32 scores.
    for (int g = warp; g < GROUP; g += DEC_THREADS / 32) {
      float sv[DEC_TILE / 32];
      float mx = kiln::neg_inf();
#pragma unroll
      for (int i = 0; i < DEC_TILE / 32; ++i) { sv[i] = s_p[g][lane + 32 * i]; mx = fmaxf(mx, sv[i]); }
      const float m_old = s_m[g];
      mx = kiln::warp_max(mx);
      const float m_new = fmaxf(m_old, mx);
      const float alpha = exp2f(m_old - m_new);  // 0 on the first tile (m_old = -inf)
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < DEC_TILE / 32; ++i) {
        const float pr = exp2f(sv[i] - m_new);
        s_p[g][lane + 32 * i] = pr;
        sum += pr;
      }
      sum = kiln::warp_sum(sum);
      if (lane == 0) {
        s_l[g] = s_l[g] * alpha + sum;
        s_m[g] = m_new;
        s_alpha[g] = alpha;
      }
    }
    __syncthreads();
    // O = O * alpha + P · V over this thread's token rows and 8 dims.
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      const float a = s_alpha[g];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[g][e] *= a;
    }
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      float vf[8];
      kiln::unpack8(vv[p], vf);
      const int j = p * TPR + tl;
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        const float pr = s_p[g][j];
#pragma unroll
        for (int e = 0; e < 8; ++e) o[g][e] = fmaf(pr, vf[e], o[g][e]);
      }
    }
    __syncthreads();
  }

  // Reduce O over the TPR token rows, one head at a time.
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) s_red[tl][dv * 8 + e] = o[g][e];
    __syncthreads();
    for (int d = tid; d < HEAD_DIM; d += DEC_THREADS) {
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < TPR; ++r) acc += s_red[r][d];
      const int h = kvh * GROUP + g;
      if (max_splits == 1) {
        const float l = s_l[g];
        out[((long long)b * HEADS + h) * HEAD_DIM + d] = __float2bfloat16_rn(l > 0.f ? acc / l : 0.f);
      } else {
        const long long ps = ((long long)b * HEADS + h) * max_splits + split;
        partial_o[ps * HEAD_DIM + d] = acc;
        if (d == 0) { partial_ml[ps * 2] = s_m[g]; partial_ml[ps * 2 + 1] = s_l[g]; }
      }
    }
    __syncthreads();
  }
}

template <int HEADS, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM)
attention_decode_merge(const float* __restrict__ partial_o, const float* __restrict__ partial_ml,
                       const int* __restrict__ seq_lens, bf16* __restrict__ out, int B, int max_splits) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  if (b >= B || d >= HEAD_DIM) return;
  const int L = seq_lens[b];
  const int chunk = decode_chunk(L, max_splits);
  const int n = L > 0 ? min(max_splits, (L + chunk - 1) / chunk) : 0;
  const long long base = ((long long)b * HEADS + h) * max_splits;
  float m = kiln::neg_inf();
  for (int s = 0; s < n; ++s) m = fmaxf(m, partial_ml[(base + s) * 2]);
  float acc = 0.f, l = 0.f;
  for (int s = 0; s < n; ++s) {
    const float w = exp2f(partial_ml[(base + s) * 2] - m);
    l = fmaf(partial_ml[(base + s) * 2 + 1], w, l);
    acc = fmaf(partial_o[(base + s) * HEAD_DIM + d], w, acc);
  }
  out[((long long)b * HEADS + h) * HEAD_DIM + d] = __float2bfloat16_rn(l > 0.f ? acc / l : 0.f);
}
