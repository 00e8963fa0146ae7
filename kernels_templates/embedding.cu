// embedding.cu — token embedding gather.
//
//   embedding<H>(table, ids, out, T, scale):  out[t, :] = table[ids[t], :] * scale   for t < T
//     (scale 1: an exact copy; else bf16(f32 product), Gemma's embedding times sqrt(hidden))
//
// table: [vocab, H] bf16 row-major; ids: [T] int32 (device); out: [T, H] bf16. H % 8 == 0 (rows
// are copied as 16-byte vectors; table and out must be 16-byte aligned). Ids are not range-checked
// (the tokenizer produces them); a negative id writes a zero row.
// Launch: grid (T), block EMBEDDING_THREADS (128). Any T >= 0.
#include "common.cuh"

#define EMBEDDING_THREADS 128

template <int H>
__global__ void __launch_bounds__(EMBEDDING_THREADS)
embedding(const bf16* __restrict__ table, const int* __restrict__ ids, bf16* __restrict__ out, int T,
          float scale) {
  kiln::pdl_sync();
  static_assert(H % 8 == 0, "embedding: H must be a multiple of 8");
  const int t = blockIdx.x;
  if (t >= T) return;
  const int id = ids[t];
  const uint4* src = reinterpret_cast<const uint4*>(table + (long long)(id < 0 ? 0 : id) * H);
  uint4* dst = reinterpret_cast<uint4*>(out + (long long)t * H);
  for (int v = threadIdx.x; v < H / 8; v += EMBEDDING_THREADS) {
    uint4 r = id < 0 ? make_uint4(0, 0, 0, 0) : kiln::ld_cached16(src + v);
    if (scale != 1.f) {
      float f[8];
      kiln::unpack8(r, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] *= scale;
      r = kiln::pack8(f);
    }
    dst[v] = r;
  }
}
