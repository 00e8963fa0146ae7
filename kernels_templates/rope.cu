// rope.cu — rotary position embedding on the fused QKV projection, and the paged KV-cache append.
//
//   rope_append<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(qkv, positions, slot_mapping, k_cache, v_cache, T, theta)
//     For token t at position p = positions[t], every q head and k head is rotated in place with
//     HF's rotate_half pairing (i, i + HEAD_DIM/2), i < HEAD_DIM/2:
//       inv_freq_i = 1 / theta^(2i / HEAD_DIM)   (f32, as HF computes it)
//       angle = p * inv_freq_i (f32); c = cos(angle), s = sin(angle) (f32, accurate sincosf)
//       x'[i] = x[i]*c - x[i+HALF]*s ;  x'[i+HALF] = x[i+HALF]*c + x[i]*s   (f32, one rounding)
//     then the rotated k and the plain v of the token are written to the cache slot
//     slot_mapping[t] (= physical_block * BLOCK + offset; a negative slot skips the write, for
//     padding tokens). q stays in qkv for the attention kernels; k is also rotated in qkv.
//
// Layouts: qkv [T, (HEADS + 2*KV_HEADS) * HEAD_DIM] bf16, each row q heads | k heads | v heads;
// k_cache, v_cache [num_blocks, BLOCK, KV_HEADS, HEAD_DIM] bf16 (a slot's KV_HEADS*HEAD_DIM
// elements are contiguous); positions, slot_mapping [T] int32. HEAD_DIM % 8 == 0, 16-byte aligned.
// Launch: grid (T), block ROPE_THREADS (128). Any T >= 0.
#include "common.cuh"

#define ROPE_THREADS 128

template <int HEADS, int KV_HEADS, int HEAD_DIM, int BLOCK>
__global__ void __launch_bounds__(ROPE_THREADS)
rope_append(bf16* qkv, const int* __restrict__ positions, const int* __restrict__ slot_mapping,
            bf16* __restrict__ k_cache, bf16* __restrict__ v_cache, int T, float theta) {
  kiln::pdl_sync();
  static_assert(HEAD_DIM % 8 == 0, "rope_append: HEAD_DIM must be a multiple of 8");
  static_assert(HEADS % KV_HEADS == 0, "rope_append: HEADS must be a multiple of KV_HEADS");
  constexpr int HALF = HEAD_DIM / 2;
  constexpr int PAIRS2 = HALF / 2;  // each thread rotates 2 adjacent pairs (bf16x2 accesses)
  constexpr int STRIDE = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
  constexpr int KVROW = KV_HEADS * HEAD_DIM;
  __shared__ float cs[HALF], sn[HALF];

  const int t = blockIdx.x;
  if (t >= T) return;
  const int pos = positions[t];
  const int slot = slot_mapping[t];
  for (int i = threadIdx.x; i < HALF; i += ROPE_THREADS) {
    const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)HEAD_DIM);
    const float angle = (float)pos * inv_freq;
    float s, c;
    sincosf(angle, &s, &c);
    cs[i] = c;
    sn[i] = s;
  }
  __syncthreads();

  bf16* row = qkv + (long long)t * STRIDE;
  for (int idx = threadIdx.x; idx < (HEADS + KV_HEADS) * PAIRS2; idx += ROPE_THREADS) {
    const int h = idx / PAIRS2;
    const int i = (idx - h * PAIRS2) * 2;
    bf16* base = row + h * HEAD_DIM;
    const float2 a = __bfloat1622float2(*reinterpret_cast<const bf162*>(base + i));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const bf162*>(base + HALF + i));
    const float c0 = cs[i], c1 = cs[i + 1], s0 = sn[i], s1 = sn[i + 1];
    const bf162 na = __floats2bfloat162_rn(a.x * c0 - b.x * s0, a.y * c1 - b.y * s1);
    const bf162 nb = __floats2bfloat162_rn(b.x * c0 + a.x * s0, b.y * c1 + a.y * s1);
    *reinterpret_cast<bf162*>(base + i) = na;
    *reinterpret_cast<bf162*>(base + HALF + i) = nb;
    if (h >= HEADS && slot >= 0) {
      bf16* kc = k_cache + (long long)slot * KVROW + (h - HEADS) * HEAD_DIM;
      *reinterpret_cast<bf162*>(kc + i) = na;
      *reinterpret_cast<bf162*>(kc + HALF + i) = nb;
    }
  }
  if (slot >= 0) {
    const uint4* vsrc = reinterpret_cast<const uint4*>(row + (HEADS + KV_HEADS) * HEAD_DIM);
    uint4* vdst = reinterpret_cast<uint4*>(v_cache + (long long)slot * KVROW);
    for (int v = threadIdx.x; v < KVROW / 8; v += ROPE_THREADS) vdst[v] = vsrc[v];
  }
}
