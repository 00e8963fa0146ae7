// attention_prefill.cu — causal prefill attention over the paged KV cache on tensor cores
// (FlashAttention-2 scheme: mma.sync m16n8k16 bf16 -> f32, ldmatrix, cp.async, online softmax).
//
//   attention_prefill<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(qkv, k_cache, v_cache, block_tables,
//       max_blocks, seq_lens, query_start, out, B, scale, window)
//     Sequence b < B owns packed query rows [query_start[b], query_start[b+1]) of qkv; with
//     q_len = query_start[b+1] - query_start[b] and L = seq_lens[b] (KV length after this step's
//     append, keys already in the cache via rope_append), query i sits at position L - q_len + i
//     and attends to keys 0 ..= that position (so earlier chunks of a long prompt are seen too),
//     or with a sliding window (window > 0) to the `window` keys up to it:
//       out[query_start[b] + i, h, :] = softmax_j(scale * q_i·k_j) · v_j
//     GQA: q head h reads kv head h / (HEADS / KV_HEADS).
//
// Layouts: qkv [T, (HEADS+2*KV_HEADS)*HEAD_DIM] bf16 (q already rotated); k_cache, v_cache
// [num_blocks, BLOCK, KV_HEADS, HEAD_DIM] bf16; block_tables [B, max_blocks] int32; seq_lens [B],
// query_start [B+1] int32; out [T, HEADS*HEAD_DIM] bf16. HEAD_DIM is 64 or 128; all rows 16-byte
// aligned.
// Work split: a CTA of 4 warps owns PF_BR = 64 query rows of one (sequence, q head), 16 per warp;
// it walks key tiles of PF_BC = 32 up to its last row's position through a PF_STAGES = 3 deep
// cp.async pipeline (tile j+2 loads while tile j computes; one barrier per tile). K and V tiles
// live in swizzled shared memory (3 stages * 2 * 32 * HEAD_DIM bf16: 48 KB at HEAD_DIM 128,
// static); the Q tile is staged once through the last stage's buffers and then held in
// registers. P stays in registers (the m16n8 accumulator layout is the A-operand layout).
// Masking only on tiles that cross the diagonal, the end of the keys or a window's first key (key
// tiles wholly before the CTA's first row's window are not loaded). Rows and keys out of
// range are zero-filled by cp.async and never stored.
// Launch: grid (HEADS, ceil(Q / 64), B), Q the longest q_len (T at most) — y counts tiles from
// the longest one down (see kiln::prefill_tile); tiles past a sequence's q_len exit at once —
// block PF_THREADS (128), no dynamic shared memory.
#include "common.cuh"

#define PF_THREADS 128
#define PF_BR 64
#define PF_BC 32
#define PF_STAGES 3

namespace pf {

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(kiln::smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(kiln::smem_u32(p)));
}

// d += a · b  (m16n8k16, bf16 inputs, f32 accumulators)
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Swizzled tile of R rows x D bf16: 16-byte chunk c of row r sits at chunk r*(D/8) + (c ^ (r & 7)),
// so the 8 rows an ldmatrix reads at one chunk column fall in 8 different bank groups.
template <int D>
__device__ __forceinline__ bf16* tile_at(bf16* base, int r, int c) {
  return base + (r * (D / 8) + (c ^ (r & 7))) * 8;
}

}  // namespace pf

template <int HEADS, int KV_HEADS, int HEAD_DIM, int BLOCK>
__global__ void __launch_bounds__(PF_THREADS)
attention_prefill(const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
                  const bf16* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks,
                  const int* __restrict__ seq_lens, const int* __restrict__ query_start,
                  bf16* __restrict__ out, int B, float scale, int window) {
  kiln::pdl_sync();
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "attention_prefill: HEAD_DIM must be 64 or 128");
  static_assert(HEADS % KV_HEADS == 0, "attention_prefill: HEADS must be a multiple of KV_HEADS");
  constexpr int D = HEAD_DIM;
  constexpr int CH = D / 8;  // 16-byte chunks per row
  constexpr int STRIDE = (HEADS + 2 * KV_HEADS) * D;
  constexpr int KVROW = KV_HEADS * D;
  constexpr int KS = D / 16;       // k-steps of S = Q K^T
  constexpr int NT = PF_BC / 8;    // n-tiles of S
  constexpr int DT = D / 8;        // n-tiles of O
  constexpr float LOG2E = 1.4426950408889634f;

  // Stage s holds K at smem[s][0] and V at smem[s][1]; the Q tile (PF_BR = 2 * PF_BC rows) is
  // staged first in the last stage's K and V buffers, which are contiguous.
  static_assert(PF_BR == 2 * PF_BC, "attention_prefill: the Q tile must fill one stage");
  __shared__ __align__(128) bf16 smem[PF_STAGES][2][PF_BC * D];
  bf16* sQ = &smem[PF_STAGES - 1][0][0];

  kiln::PrefillTile tile;
  if (!kiln::prefill_tile(PF_BR, query_start, seq_lens, B, tile)) return;
  const int b = tile.b, h = tile.h, qs = tile.qs, q_len = tile.q_len, q0 = tile.q0, L = tile.L;
  const int past = tile.past;  // position of query row 0
  const int kvh = h / (HEADS / KV_HEADS);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int* bt = block_tables + (long long)b * max_blocks;

  // Keys this CTA needs: up to the position of its last row (and never past L).
  const int kv_end = min(L, past + min(q0 + PF_BR, q_len));
  const int ntiles = (kv_end + PF_BC - 1) / PF_BC;
  // With a sliding window the first tiles, before the first row's first key, are not needed.
  const int kt0 = window > 0 ? max(0, past + q0 - window + 1) / PF_BC : 0;

  // This thread's share of a K/V tile copy: rows lr0 + i * RPP, chunk lc (loop invariants).
  constexpr int RPP = PF_THREADS / CH;          // rows per pass of the CTA
  constexpr int LPT = PF_BC * CH / PF_THREADS;  // 16-byte copies per thread per K (or V) tile
  const int lr0 = tid / CH, lc = tid % CH;
  int soff[LPT];  // element offsets inside a stage buffer (swizzled)
#pragma unroll
  for (int i = 0; i < LPT; ++i) {
    const int r = lr0 + i * RPP;
    soff[i] = (r * CH + (lc ^ (r & 7))) * 8;
  }
  const bf16* kbase = k_cache + kvh * D + lc * 8;
  const bf16* vbase = v_cache + kvh * D + lc * 8;
  // Issues the cp.async copies of key tile kt (K and V) into stage `st`.
  auto load_tile = [&](int st, int kt) {
#pragma unroll
    for (int i = 0; i < LPT; ++i) {
      const unsigned pos = (unsigned)(kt * PF_BC + lr0 + i * RPP);
      const bool valid = (int)pos < kv_end;
      long long off = 0;
      if (valid) off = ((long long)bt[pos / BLOCK] * BLOCK + pos % BLOCK) * KVROW;
      kiln::cp_async16(kiln::smem_u32(&smem[st][0][0] + soff[i]), kbase + off, valid);
      kiln::cp_async16(kiln::smem_u32(&smem[st][1][0] + soff[i]), vbase + off, valid);
    }
  };

  // Prologue: Q and tile 0 (group 0), tile 1 (group 1).
#pragma unroll
  for (int i = 0; i < PF_BR * CH / PF_THREADS; ++i) {
    const int idx = tid + i * PF_THREADS;
    const int r = idx / CH, c = idx % CH;
    const bool valid = q0 + r < q_len;
    const bf16* src = valid ? qkv + (long long)(qs + q0 + r) * STRIDE + h * D + c * 8 : qkv;
    kiln::cp_async16(kiln::smem_u32(pf::tile_at<D>(sQ, r, c)), src, valid);
  }
  load_tile(0, kt0);
  kiln::cp_async_commit();
  if (kt0 + 1 < ntiles) load_tile(1, kt0 + 1);
  kiln::cp_async_commit();
  kiln::cp_async_wait<1>();
  __syncthreads();

  // Q fragments of this warp's 16 rows (A operand, row-major).
  unsigned qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    pf::ldsm_x4(qf[ks], pf::tile_at<D>(sQ, warp * 16 + (lane & 15), ks * 2 + (lane >> 4)));

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {kiln::neg_inf(), kiln::neg_inf()};
  float l_run[2] = {0.f, 0.f};  // this thread's partial row sums (reduced over the quad at the end)
  const float sl2 = scale * LOG2E;
  // Positions of the two rows this thread holds (rows g and g + 8 of the warp's 16).
  const int row_pos0 = past + q0 + warp * 16 + (lane >> 2);
  const int row_pos1 = row_pos0 + 8;
  const int cta_first_pos = past + q0;

  int st = 0, st_next2 = 2;  // stages of tile kt and of tile kt + 2
  for (int kt = kt0; kt < ntiles; ++kt) {
    kiln::cp_async_wait<1>();  // tile kt landed (only tile kt+1 may still be in flight)
    __syncthreads();        // ... for every thread; every warp is done with tile kt-1 (and Q)
    if (kt + 2 < ntiles) load_tile(st_next2, kt + 2);
    kiln::cp_async_commit();  // possibly empty: keeps one group per tile
    const bf16* sK = &smem[st][0][0];
    const bf16* sV = &smem[st][1][0];
    st = st == PF_STAGES - 1 ? 0 : st + 1;
    st_next2 = st_next2 == PF_STAGES - 1 ? 0 : st_next2 + 1;

    // S = Q K^T for 16 rows x PF_BC keys.
    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    // k-steps outermost: the NT accumulators form independent MMA chains.
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        unsigned kb[4];
        pf::ldsm_x4(kb, pf::tile_at<D>(const_cast<bf16*>(sK), np * 16 + (lane >> 4) * 8 + (lane & 7), ks * 2 + ((lane >> 3) & 1)));
        pf::mma16816(s[2 * np], qf[ks], kb[0], kb[1]);
        pf::mma16816(s[2 * np + 1], qf[ks], kb[2], kb[3]);
      }
    }

    // Mask, online softmax (running max in raw score units; the scale folds into one FFMA).
    const int key0 = kt * PF_BC;
    const bool need_mask = key0 + PF_BC - 1 > cta_first_pos || key0 + PF_BC > kv_end ||
                           (window > 0 && key0 <= cta_first_pos + PF_BR - 1 - window);
    float mx[2] = {kiln::neg_inf(), kiln::neg_inf()};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (need_mask) {
          const int key = key0 + nt * 8 + (lane & 3) * 2 + (e & 1);
          const int rp = e < 2 ? row_pos0 : row_pos1;
          if (key > rp || key >= kv_end || (window > 0 && key <= rp - window)) s[nt][e] = kiln::neg_inf();
        }
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
    }
    float alpha[2], msc[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) kiln::quad_softmax_update(mx[r], sl2, m_run[r], alpha[r], msc[r]);
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = kiln::exp2_ftz(fmaf(s[nt][e], sl2, msc[e >> 1]));
        s[nt][e] = p;
        rs[e >> 1] += p;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
    // Rescale O only when some row's max moved (warp-uniform branch).
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        o[i][0] *= alpha[0]; o[i][1] *= alpha[0];
        o[i][2] *= alpha[1]; o[i][3] *= alpha[1];
      }
    }

    // O += P V: P (bf16) from the S accumulators, V through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < PF_BC / 16; ++kk) {
      unsigned pa[4];
      pa[0] = kiln::f2_to_bf2(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = kiln::f2_to_bf2(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = kiln::f2_to_bf2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = kiln::f2_to_bf2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        unsigned vb[4];
        pf::ldsm_x4_t(vb, pf::tile_at<D>(const_cast<bf16*>(sV), kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4)));
        pf::mma16816(o[2 * dp], pa, vb[0], vb[1]);
        pf::mma16816(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
  }
  kiln::cp_async_wait<0>();

  // Normalize and store the valid rows.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    l_run[r] = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
  }
  const int row0 = q0 + warp * 16 + (lane >> 2);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + r * 8;
    if (row < q_len) {
      bf16* dst = out + (long long)(qs + row) * (HEADS * D) + h * D + (lane & 3) * 2;
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        *reinterpret_cast<unsigned*>(dst + i * 8) =
            kiln::f2_to_bf2(o[i][2 * r] * l_run[r], o[i][2 * r + 1] * l_run[r]);
      }
    }
  }
}
