// rope.cu — rotary position embedding on the fused QKV projection, and the paged KV-cache append.
//
//   rope_append<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(qkv, positions, slot_mapping, k_cache, v_cache, T, inv_freq)
//     For token t at position p = positions[t], every q head and k head is rotated in place with
//     HF's rotate_half pairing (i, i + HEAD_DIM/2), i < HEAD_DIM/2:
//       angle = p * inv_freq[i] (f32; inv_freq [HEAD_DIM / 2] f32 is the model's table); c = cos(angle), s = sin(angle) (f32, accurate sincosf)
//       x'[i] = x[i]*c - x[i+HALF]*s ;  x'[i+HALF] = x[i+HALF]*c + x[i]*s   (f32, one rounding)
//     then the rotated k and the plain v of the token are written to the cache slot
//     slot_mapping[t] (= physical_block * BLOCK + offset; a negative slot skips the write, for
//     padding tokens). q stays in qkv for the attention kernels; k is also rotated in qkv.
//
// Layouts: qkv [T, (HEADS + 2*KV_HEADS) * HEAD_DIM] bf16, each row q heads | k heads | v heads;
// k_cache, v_cache [num_blocks, BLOCK, KV_HEADS, HEAD_DIM] bf16 (a slot's KV_HEADS*HEAD_DIM
// elements are contiguous); positions, slot_mapping [T] int32. HEAD_DIM % 8 == 0, 16-byte aligned.
// Work split: block (t, y) holds token t; its warp w rotates heads y * ROPE_WARPS + w, then every
// gridDim.y * ROPE_WARPS further, of the HEADS + KV_HEADS rotated heads; the warp of k head j
// also copies v head j into the cache. Each lane computes the cos/sin of its own pairs once and
// uses them for every head it rotates (no shared memory, no block barrier).
// Launch: grid (T, Y) with 1 <= Y <= ceil((HEADS + KV_HEADS) / ROPE_WARPS) — decode takes the
// largest Y (a warp per head), long prefills Y = 1 (a CTA per token) — block ROPE_WARPS * 32
// (128). Any T >= 0.
#include "common.cuh"

#define ROPE_WARPS 4

template <int HEADS, int KV_HEADS, int HEAD_DIM, int BLOCK>
__global__ void __launch_bounds__(ROPE_WARPS * 32)
rope_append(bf16* qkv, const int* __restrict__ positions, const int* __restrict__ slot_mapping,
            bf16* __restrict__ k_cache, bf16* __restrict__ v_cache, int T,
            const float* __restrict__ inv_freq) {
  kiln::pdl_sync();
  static_assert(HEAD_DIM % 8 == 0, "rope_append: HEAD_DIM must be a multiple of 8");
  static_assert(HEADS % KV_HEADS == 0, "rope_append: HEADS must be a multiple of KV_HEADS");
  constexpr int HALF = HEAD_DIM / 2;
  constexpr int PAIRS2 = HALF / 2;  // each lane rotates 2 adjacent pairs (bf16x2 accesses)
  constexpr int STRIDE = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
  constexpr int KVROW = KV_HEADS * HEAD_DIM;

  constexpr int NH = HEADS + KV_HEADS;
  constexpr int PL = (PAIRS2 + 31) / 32;  // pair groups per lane

  const int t = blockIdx.x;
  const int lane = threadIdx.x & 31;
  if (t >= T) return;
  const int pos = positions[t];
  const int slot = slot_mapping[t];
  float c[PL][2], sn[PL][2];
#pragma unroll
  for (int q = 0; q < PL; ++q) {
    const int i = 2 * (lane + 32 * q);
#pragma unroll
    for (int j = 0; j < 2; ++j) kiln::rope_sincos(pos, i + j, inv_freq, &sn[q][j], &c[q][j]);
  }
  bf16* row = qkv + (long long)t * STRIDE;
  for (int h = blockIdx.y * ROPE_WARPS + (threadIdx.x >> 5); h < NH; h += gridDim.y * ROPE_WARPS) {
    bf16* base = row + h * HEAD_DIM;
    bf16* kc = h >= HEADS && slot >= 0 ? k_cache + (long long)slot * KVROW + (h - HEADS) * HEAD_DIM : nullptr;
#pragma unroll
    for (int q = 0; q < PL; ++q) {
      const int p = lane + 32 * q;
      if (PAIRS2 % 32 != 0 && p >= PAIRS2) continue;
      const int i = 2 * p;
      const float2 a = __bfloat1622float2(*reinterpret_cast<const bf162*>(base + i));
      const float2 b = __bfloat1622float2(*reinterpret_cast<const bf162*>(base + HALF + i));
      const bf162 na = __floats2bfloat162_rn(a.x * c[q][0] - b.x * sn[q][0], a.y * c[q][1] - b.y * sn[q][1]);
      const bf162 nb = __floats2bfloat162_rn(b.x * c[q][0] + a.x * sn[q][0], b.y * c[q][1] + a.y * sn[q][1]);
      *reinterpret_cast<bf162*>(base + i) = na;
      *reinterpret_cast<bf162*>(base + HALF + i) = nb;
      if (kc) {
        *reinterpret_cast<bf162*>(kc + i) = na;
        *reinterpret_cast<bf162*>(kc + HALF + i) = nb;
      }
    }
    if (kc) {
      const int kvh = h - HEADS;
      const uint4* vsrc = reinterpret_cast<const uint4*>(row + (HEADS + KV_HEADS + kvh) * HEAD_DIM);
      uint4* vdst = reinterpret_cast<uint4*>(v_cache + (long long)slot * KVROW + kvh * HEAD_DIM);
      for (int v = lane; v < HEAD_DIM / 8; v += 32) vdst[v] = vsrc[v];
    }
  }
}
