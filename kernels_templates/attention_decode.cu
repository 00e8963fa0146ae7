// attention_decode.cu — decode attention over the paged KV cache: one new token per sequence,
// GQA without repeating K/V, split-KV ("flash-decoding") with a log-sum-exp merge.
//
//   attention_decode<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(qkv, k_cache, v_cache, block_tables,
//       max_blocks, seq_lens, slot_mapping, inv_freq, out, B, scale, partial_o, partial_ml,
//       max_splits, window)
//     For sequence b < B with L = seq_lens[b] tokens (this step's token included, at position
//     L - 1) and q head h (kv head h / (HEADS/KV_HEADS)):
//       out[b, h, :] = softmax_j(scale * q·k_j) · v_j  over lo <= j < L,
//     lo = max(0, L - window) with a sliding window (window > 0), else 0.
//     Row b of qkv ([B, (HEADS+2*KV_HEADS)*HEAD_DIM]) is the step's token, not yet rotated: the
//     kernel applies RoPE (rope.cu's rule, position L - 1, table inv_freq) to q in registers and, in
//     the one CTA per (b, kv head) whose range holds position L - 1, to k, which it writes with v
//     into cache slot slot_mapping[b] (skipped when negative) and uses from shared memory: the
//     decode step needs no rope_append launch.
//   attention_decode_merge<HEADS, HEAD_DIM>(partial_o, partial_ml, seq_lens, out, B, max_splits,
//       window)
//     Combines the splits of each (b, h) by log-sum-exp.
//
// Layouts: k_cache, v_cache [num_blocks, BLOCK, KV_HEADS, HEAD_DIM] bf16; block_tables
// [B, max_blocks] int32 (token position p lives in slot block_tables[b, p / BLOCK] * BLOCK +
// p % BLOCK); seq_lens, slot_mapping [B] int32; out [B, HEADS * HEAD_DIM] bf16.
// Work split: grid (max_splits, KV_HEADS, B). A CTA serves the whole q-head group of its kv head
// (K/V read once per group, the FlashInfer layout) over the token range
// [lo + split * chunk, min(L, lo + (split + 1) * chunk)), chunk = decode_chunk(L - lo, max_splits) (a multiple of
// DEC_TILE = 64); CTAs whose range is empty exit at once, so size max_splits for the longest
// context and let short sequences use fewer splits. Inside a CTA each of the 4 warps walks its own
// warp tiles (8 passes of 32/(HEAD_DIM/8) token rows, HEAD_DIM/8 lanes per row, 16-byte K/V
// loads) with its own online-softmax state and no block-wide barrier; the warps' states are
// merged through shared memory at the end.
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

// First key a query at position L - 1 sees: L - window with a sliding window, else 0.
__device__ __forceinline__ int decode_first(int L, int window) {
  return window > 0 && L > window ? L - window : 0;
}

// Tokens per split for a range of L tokens: at least one tile, a multiple of DEC_TILE.
__device__ __forceinline__ int decode_chunk(int L, int max_splits) {
  int c = (L + max_splits - 1) / max_splits;
  c = (c + DEC_TILE - 1) / DEC_TILE * DEC_TILE;
  return c < DEC_TILE ? DEC_TILE : c;
}

template <int HEADS, int KV_HEADS, int HEAD_DIM, int BLOCK>
__global__ void __launch_bounds__(DEC_THREADS)
attention_decode(const bf16* __restrict__ qkv, bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                 const int* __restrict__ block_tables, int max_blocks, const int* __restrict__ seq_lens,
                 const int* __restrict__ slot_mapping, const float* __restrict__ inv_freq,
                 bf16* __restrict__ out, int B,
                 float scale, float* __restrict__ partial_o, float* __restrict__ partial_ml,
                 int max_splits, int window) {
  static_assert(HEADS % KV_HEADS == 0, "attention_decode: HEADS must be a multiple of KV_HEADS");
  static_assert(HEAD_DIM % 8 == 0 && 32 % (HEAD_DIM / 8) == 0 && HEAD_DIM <= 256,
                "attention_decode: HEAD_DIM / 8 must divide 32");
  constexpr int GROUP = HEADS / KV_HEADS;
  constexpr int NWARPS = DEC_THREADS / 32;
  constexpr int VPR = HEAD_DIM / 8;        // lanes per token row (16 bytes of K/V each)
  constexpr int TPP = 32 / VPR;            // token rows per warp pass
  constexpr int PASSES = 8;
  constexpr int WTILE = TPP * PASSES;      // tokens per warp tile
  constexpr int STRIDE = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
  constexpr int KVROW = KV_HEADS * HEAD_DIM;
  constexpr float LOG2E = 1.4426950408889634f;

  __shared__ float s_o[NWARPS][GROUP][HEAD_DIM];
  __shared__ float s_m[NWARPS][GROUP], s_l[NWARPS][GROUP];
  __shared__ uint4 s_newk[VPR], s_newv[VPR];  // the step's rotated k and its v (owner CTA)

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  if (b >= B) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int dv = lane % VPR, tr = lane / VPR;
  const int L = seq_lens[b];
  const int lo = decode_first(L, window);
  const int chunk = decode_chunk(L - lo, max_splits);
  const int start = lo + split * chunk;
  const int end = min(L, start + chunk);

  if (start >= end) {
    kiln::pdl_sync();
    if (L == 0 && split == 0) {  // a zero row
      for (int e = tid; e < GROUP * HEAD_DIM; e += DEC_THREADS)
        out[(long long)b * HEADS * HEAD_DIM + kvh * GROUP * HEAD_DIM + e] = __float2bfloat16_rn(0.f);
    }
    return;
  }

  // RoPE of this lane's 8 dims at position L - 1: dims d < HALF pair with d + HALF, which the
  // lane VPR/2 away holds; cos/sin of pair index d mod HALF (kiln::rope_sincos, as rope.cu).
  constexpr int HALF = HEAD_DIM / 2;
  const bool lower = dv < VPR / 2;
  float c[8], sn[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) kiln::rope_sincos(L - 1, (dv * 8 + e) % HALF, inv_freq, &sn[e], &c[e]);
  // Everything above reads only step metadata (written by the host before the step), so it
  // overlaps the previous kernel; activations and the cache are read after this.
  kiln::pdl_sync();
  // Rotates 8 dims given the partner lane's 8, rounding to bf16 as rope_append stores them.
  auto rope8 = [&](uint4 v) {
    uint4 pv;
    pv.x = __shfl_xor_sync(0xffffffffu, v.x, VPR / 2);
    pv.y = __shfl_xor_sync(0xffffffffu, v.y, VPR / 2);
    pv.z = __shfl_xor_sync(0xffffffffu, v.z, VPR / 2);
    pv.w = __shfl_xor_sync(0xffffffffu, v.w, VPR / 2);
    float a[8], pa[8];
    kiln::unpack8(v, a);
    kiln::unpack8(pv, pa);
#pragma unroll
    for (int e = 0; e < 8; ++e) a[e] = lower ? a[e] * c[e] - pa[e] * sn[e] : a[e] * c[e] + pa[e] * sn[e];
    return kiln::pack8(a);
  };

  // This lane's 8 dims of every q head of the group, rotated, pre-scaled into log2 units.
  float q[GROUP][8];
  const bf16* qrow = qkv + (long long)b * STRIDE;
  {
    const float qs = scale * LOG2E;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      kiln::unpack8(rope8(kiln::ld_cached16(qrow + (kvh * GROUP + g) * HEAD_DIM + dv * 8)), q[g]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] *= qs;
    }
  }
  // The CTA holding position L - 1 appends the step's k (rotated) and v to the cache.
  const bool owner = start <= L - 1 && L - 1 < end;
  if (owner) {
    if (warp == 0) {
      const uint4 k = rope8(kiln::ld_cached16(qrow + (HEADS + kvh) * HEAD_DIM + dv * 8));
      const uint4 v = kiln::ld_cached16(qrow + (HEADS + KV_HEADS + kvh) * HEAD_DIM + dv * 8);
      const int slot = slot_mapping[b];
      if (lane < VPR) {
        s_newk[dv] = k;
        s_newv[dv] = v;
        if (slot >= 0) {
          *reinterpret_cast<uint4*>(k_cache + (long long)slot * KVROW + kvh * HEAD_DIM + dv * 8) = k;
          *reinterpret_cast<uint4*>(v_cache + (long long)slot * KVROW + kvh * HEAD_DIM + dv * 8) = v;
        }
      }
    }
    __syncthreads();
  }
  // Per-warp online-softmax state (identical in every lane): running max (log2 units), sum, and
  // this lane's 8 dims of the unnormalized output of its token rows.
  float m[GROUP], l[GROUP], o[GROUP][8];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    m[g] = kiln::neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[g][e] = 0.f;
  }

  const int* bt = block_tables + (long long)b * max_blocks;
  const long long head_off = (long long)kvh * HEAD_DIM + dv * 8;

  // Warps take warp tiles of WTILE tokens in turn; no block-wide barrier inside the loop.
  for (int ts = start + warp * WTILE; ts < end; ts += NWARPS * WTILE) {
    uint4 kv[PASSES], vv[PASSES];
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      const int pos = ts + p * TPP + tr;
      if (owner && pos == L - 1) {
        kv[p] = s_newk[dv];
        vv[p] = s_newv[dv];
      } else if (pos < end) {
        const long long slot = (long long)bt[pos / BLOCK] * BLOCK + pos % BLOCK;
        kv[p] = kiln::ld_cached16(k_cache + slot * KVROW + head_off);
        vv[p] = kiln::ld_cached16(v_cache + slot * KVROW + head_off);
      } else {
        kv[p] = make_uint4(0, 0, 0, 0);
        vv[p] = make_uint4(0, 0, 0, 0);
      }
    }
    // Scores of this lane's token row in each pass, reduced over the row's VPR lanes.
    float s[PASSES][GROUP];
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      float kf[8];
      kiln::unpack8(kv[p], kf);
      const bool valid = ts + p * TPP + tr < end;
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(q[g][e], kf[e], d);
#pragma unroll
        for (int off = VPR / 2; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
        s[p][g] = valid ? d : kiln::neg_inf();
      }
    }
    // Online softmax over the warp tile (token 0 of the tile is always valid).
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float mx = s[0][g];
#pragma unroll
      for (int p = 1; p < PASSES; ++p) mx = fmaxf(mx, s[p][g]);
#pragma unroll
      for (int off = VPR; off < 32; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m[g], mx);
      const float alpha = exp2f(m[g] - m_new);  // 0 on the warp's first tile
      float sum = 0.f;
#pragma unroll
      for (int p = 0; p < PASSES; ++p) {
        s[p][g] = exp2f(s[p][g] - m_new);
        sum += s[p][g];
      }
#pragma unroll
      for (int off = VPR; off < 32; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      l[g] = l[g] * alpha + sum;
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[g][e] *= alpha;
    }
    // O += P · V for this lane's token rows and dims.
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      float vf[8];
      kiln::unpack8(vv[p], vf);
#pragma unroll
      for (int g = 0; g < GROUP; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) o[g][e] = fmaf(s[p][g], vf[e], o[g][e]);
    }
  }

  // Sum O over the token rows of the warp, then merge the warps' states through shared memory.
#pragma unroll
  for (int g = 0; g < GROUP; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e)
#pragma unroll
      for (int off = VPR; off < 32; off <<= 1) o[g][e] += __shfl_xor_sync(0xffffffffu, o[g][e], off);
  if (lane < VPR) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) s_o[warp][g][dv * 8 + e] = o[g][e];
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) { s_m[warp][g] = m[g]; s_l[warp][g] = l[g]; }
  }
  __syncthreads();
  for (int idx = tid; idx < GROUP * HEAD_DIM; idx += DEC_THREADS) {
    const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float mt = kiln::neg_inf();
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) mt = fmaxf(mt, s_m[w][g]);
    float acc = 0.f, lt = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const float f = s_m[w][g] == kiln::neg_inf() ? 0.f : exp2f(s_m[w][g] - mt);  // idle warps add 0
      acc = fmaf(s_o[w][g][d], f, acc);
      lt = fmaf(s_l[w][g], f, lt);
    }
    const int h = kvh * GROUP + g;
    if (max_splits == 1) {
      out[((long long)b * HEADS + h) * HEAD_DIM + d] = __float2bfloat16_rn(lt > 0.f ? acc / lt : 0.f);
    } else {
      const long long ps = ((long long)b * HEADS + h) * max_splits + split;
      partial_o[ps * HEAD_DIM + d] = acc;
      if (d == 0) { partial_ml[ps * 2] = mt; partial_ml[ps * 2 + 1] = lt; }
    }
  }
}

template <int HEADS, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM)
attention_decode_merge(const float* __restrict__ partial_o, const float* __restrict__ partial_ml,
                       const int* __restrict__ seq_lens, bf16* __restrict__ out, int B, int max_splits,
                       int window) {
  kiln::pdl_sync();
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  if (b >= B || d >= HEAD_DIM) return;
  const int L = seq_lens[b];
  const int span = L - decode_first(L, window);
  const int chunk = decode_chunk(span, max_splits);
  const int n = L > 0 ? min(max_splits, (span + chunk - 1) / chunk) : 0;
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
