// attention_prefill_sm90.cu — causal prefill attention over the paged KV cache on Hopper's
// warpgroup tensor cores (wgmma, compiled for sm_90a; same contract as attention_prefill.cu,
// which runs on other GPUs).
//
//   attention_prefill_sm90<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(qkv, k_cache, v_cache,
//       block_tables, max_blocks, seq_lens, query_start, out, B, scale, window)
//     Sequence b < B owns packed query rows [query_start[b], query_start[b+1]) of qkv; with
//     q_len = query_start[b+1] - query_start[b] and L = seq_lens[b] (KV length after this step's
//     append, keys already in the cache via rope_append), query i sits at position L - q_len + i
//     and attends to keys 0 ..= that position (with a sliding window, window > 0, only to the
//     `window` keys up to it: the earlier ones are masked, their tiles still loaded and computed):
//       out[query_start[b] + i, h, :] = softmax_j(scale * q_i·k_j) · v_j
//     GQA: q head h reads kv head h / (HEADS / KV_HEADS).
//
// Layouts: qkv [T, (HEADS+2*KV_HEADS)*HEAD_DIM] bf16 (q already rotated); k_cache, v_cache
// [num_blocks, BLOCK, KV_HEADS, HEAD_DIM] bf16; block_tables [B, max_blocks] int32; seq_lens [B],
// query_start [B+1] int32; out [T, HEADS*HEAD_DIM] bf16. HEAD_DIM is 64 or 128; rows 16-byte
// aligned.
// Work split (warp-specialized, FlashAttention-3 style): a CTA owns 128 query rows of one
// (sequence, q head) and has three warpgroups. Warpgroup 0 produces: it copies Q and then the
// key tiles (PH_BC = 64 keys of K and V) up to the CTA's last row into a ring of PH_STAGES
// shared-memory stages with cp.async, signalling each stage's `full` mbarrier once its copies
// landed and waiting on the stage's `empty` mbarrier before refilling it. Warpgroups 1 and 2
// consume, each for 64 query rows, at their own pace: S = Q·Kᵀ by wgmma m64n64k16 with Q and K
// in shared memory; masking and the online softmax on the S accumulators; O += P·V by wgmma
// m64nDk16 with P from registers (the accumulator layout of S is the A-fragment layout) and V
// read N-major from shared memory; then they release the stage. The S product of tile j and
// the P·V of tile j - 1 run together, and the softmax of tile j overlaps that P·V. A consumer
// whose rows all precede a tile skips its math. setmaxnreg moves registers from the producer
// (40) to the consumers (232).
// Shared memory (dynamic, 1024-byte aligned): Q [128 x D], PH_STAGES stages of K and V
// [PH_BC x D], then the mbarriers. Tiles are stored as column blocks of 64 elements (128-byte
// rows), 16-byte chunk c of row r at chunk c ^ (r & 7): the 128-byte swizzle the wgmma
// descriptors name.
// Launch: grid (HEADS, ceil(Q / 128), B), Q the longest q_len (T at most) — y counts tiles from
// the longest one down (kiln::prefill_tile); tiles past a sequence's q_len exit at once — block
// PH_THREADS (384), dynamic shared memory (128 + 2 * PH_STAGES * PH_BC) * HEAD_DIM * 2 + 1024
// + 128 bytes (computed the same in runtime/src/kernels.rs).
#include "common.cuh"

#define PH_THREADS 384
#define PH_BC 64      // keys per tile
// K/V tiles in the ring. At least 3: the producer signals tile j after issuing tile j + 1, whose
// stage the consumers free only after they have tile j. Measured at T = 2048 (8B shapes): 3
// stages 139 us, 4 stages 121, 5 and 6 no better; 128-key tiles with 3 stages 145.
#define PH_STAGES 4

namespace ph {

// mbarrier in shared memory (64-bit word at `bar`).
__device__ __forceinline__ void bar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Blocks until the phase with parity `parity` of the barrier has completed.
__device__ __forceinline__ void bar_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
// Register budget of the calling warpgroup (sm_90a): the producer gives registers back, the
// consumers take them.
template <int N>
__device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
// Makes this thread's shared-memory writes visible to the async proxy (wgmma operand reads).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Pins accumulator registers in place around wgmma issue and wait (no reads or writes of them
// move across).
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(unsigned (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// Plain shared-memory accesses by 32-bit shared address, and a barrier of the 128 threads of one
// warpgroup (named barrier `id`; 0 is __syncthreads').
__device__ __forceinline__ void st_shared(unsigned addr, unsigned v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared16(unsigned addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
__device__ __forceinline__ void wg_sync(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

// Shared-memory matrix descriptor with the 128-byte swizzle: start address, leading- and
// stride-dimension byte offsets (PTX ISA "Matrix Descriptor Format").
__device__ __forceinline__ unsigned long long desc(unsigned addr, unsigned lbo, unsigned sbo) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
         ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// Byte offset of 16-byte chunk c of row r in a swizzled tile of R rows (64-element column blocks).
template <int R>
__device__ __forceinline__ unsigned swz(int r, int c) {
  return (unsigned)((c >> 3) * (R * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// d = A·B (accumulate == 0) or d += A·B, m64n64k16; A and B from shared memory, both K-major.
__device__ __forceinline__ void wgmma_ss(float (&d)[32], unsigned long long da, unsigned long long db,
                                            int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(accumulate));
}

// d += A·B, m64n64k16; A from registers, B from shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const unsigned (&a)[4], unsigned long long db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// d += A·B, m64n128k16; A from registers, B from shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const unsigned (&a)[4], unsigned long long db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}


}  // namespace ph

template <int HEADS, int KV_HEADS, int HEAD_DIM, int BLOCK>
__global__ void __launch_bounds__(PH_THREADS, 1)
attention_prefill_sm90(const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
                       const bf16* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks,
                       const int* __restrict__ seq_lens, const int* __restrict__ query_start,
                       bf16* __restrict__ out, int B, float scale, int window) {
  kiln::pdl_sync();
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "attention_prefill_sm90: HEAD_DIM must be 64 or 128");
  static_assert(HEADS % KV_HEADS == 0, "attention_prefill_sm90: HEADS must be a multiple of KV_HEADS");
  constexpr int BR = 128;  // query rows per CTA: 64 per consumer warpgroup
  constexpr int D = HEAD_DIM;
  constexpr int CH = D / 8;  // 16-byte chunks per row
  constexpr int STRIDE = (HEADS + 2 * KV_HEADS) * D;
  constexpr int KVROW = KV_HEADS * D;
  constexpr int NS = PH_BC / 2;  // S accumulators per thread (m64 x PH_BC)
  constexpr int NO = D / 2;      // O accumulators per thread (m64 x D)
  constexpr unsigned Q_BYTES = BR * D * 2, KV_BYTES = PH_BC * D * 2;
  constexpr float LOG2E = 1.4426950408889634f;

  extern __shared__ unsigned char smem_raw[];
  const unsigned sQ = (kiln::smem_u32(smem_raw) + 1023u) & ~1023u;
  // Stage s: K at sK(s), V right after it; then the barriers: full[s], empty[s], q_full.
  auto sK = [&](int s) { return sQ + Q_BYTES + (unsigned)s * 2u * KV_BYTES; };
  const unsigned bars = sQ + Q_BYTES + PH_STAGES * 2u * KV_BYTES;
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (PH_STAGES + s); };
  const unsigned q_full = bars + 16u * PH_STAGES;

  kiln::PrefillTile tile;
  if (!kiln::prefill_tile(BR, query_start, seq_lens, B, tile)) return;
  const int b = tile.b, h = tile.h, qs = tile.qs, q_len = tile.q_len, q0 = tile.q0, L = tile.L;
  const int past = tile.past;  // position of query row 0
  const int kvh = h / (HEADS / KV_HEADS);
  const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7;
  const int kv_end = min(L, past + min(q0 + BR, q_len));
  const int ntiles = (kv_end + PH_BC - 1) / PH_BC;

  if (tid == 0) {
    for (int s = 0; s < PH_STAGES; ++s) {
      ph::bar_init(full(s), 128);  // every producer thread arrives once its copies landed
      ph::bar_init(empty(s), 8);   // one arrival per consumer warp
    }
    ph::bar_init(q_full, 128);
  }
  __syncthreads();

  if (wg == 0) {
    // Producer: thread p copies chunk lc of rows lr0 + i * RPP of each tile.
    ph::regs_dec<40>();
    constexpr int RPP = 128 / CH;
    const int lr0 = tid / CH, lc = tid % CH;
    const int* bt = block_tables + (long long)b * max_blocks;
    const bf16* kbase = k_cache + kvh * D + lc * 8;
    const bf16* vbase = v_cache + kvh * D + lc * 8;
#pragma unroll
    for (int i = 0; i < BR / RPP; ++i) {
      const int r = lr0 + i * RPP;
      const bool valid = q0 + r < q_len;
      const bf16* src = valid ? qkv + (long long)(qs + q0 + r) * STRIDE + h * D + lc * 8 : qkv;
      kiln::cp_async16(sQ + ph::swz<BR>(r, lc), src, valid);
    }
    kiln::cp_async_commit();
    for (int kt = 0; kt < ntiles; ++kt) {
      const int st = kt % PH_STAGES;
      if (kt >= PH_STAGES) ph::bar_wait(empty(st), ((kt / PH_STAGES) - 1) & 1);
      const unsigned dk = sK(st), dv = dk + KV_BYTES;
#pragma unroll
      for (int i = 0; i < PH_BC / RPP; ++i) {
        const int r = lr0 + i * RPP;
        const int pos = kt * PH_BC + r;
        const bool valid = pos < kv_end;
        long long off = 0;
        if (valid) off = ((long long)bt[pos / BLOCK] * BLOCK + pos % BLOCK) * KVROW;
        const unsigned so = ph::swz<PH_BC>(r, lc);
        kiln::cp_async16(dk + so, kbase + off, valid);
        kiln::cp_async16(dv + so, vbase + off, valid);
      }
      kiln::cp_async_commit();
      // The previous group (Q, or tile kt - 1) has landed for this thread: publish it to the
      // async proxy and signal it.
      kiln::cp_async_wait<1>();
      ph::fence_proxy_async();
      ph::bar_arrive(kt == 0 ? q_full : full((kt - 1) % PH_STAGES));
    }
    kiln::cp_async_wait<0>();
    ph::fence_proxy_async();
    ph::bar_arrive(ntiles == 0 ? q_full : full((ntiles - 1) % PH_STAGES));
    return;
  }

  // Consumers: warpgroup c = wg - 1 owns rows q0 + 64c .. + 63. The S = Q·Kᵀ of tile j runs on
  // the tensor cores together with the P·V of tile j - 1, and the softmax of tile j overlaps
  // that P·V (FlashAttention-3's intra-warpgroup pipelining).
  ph::regs_inc<232>();
  const int c = wg - 1, wq = (tid >> 5) & 3;
  float o[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] = 0.f;
  float m_run[2] = {kiln::neg_inf(), kiln::neg_inf()};
  float l_run[2] = {0.f, 0.f};  // this thread's partial row sums (reduced over the quad at the end)
  const float sl2 = scale * LOG2E;
  const int wg_first = past + q0 + c * 64;  // position of this warpgroup's first row
  const int row_pos0 = wg_first + wq * 16 + (lane >> 2);
  const int row_pos1 = row_pos0 + 8;
  // Tiles this warpgroup computes: those starting at or before its last row.
  const int nt = min(ntiles, (wg_first + 63) / PH_BC + 1);
  // A descriptor base of this warpgroup's 64 Q rows; stride between 8-row groups 1024 bytes.
  const unsigned long long dq0 = ph::desc(sQ + c * 64 * 128, 16, 1024);

  float s[NS];
  unsigned pa[PH_BC / 16][4];  // P (bf16 A fragments) of the tile whose P·V runs next
  // S = Q K_ktᵀ (64 rows x PH_BC keys), issued and committed; k-step kk reads 32 bytes further
  // into each 128-byte row, a column block (rows x 128 bytes) further every 4 steps.
  auto issue_scores = [&](int kt) {
    const unsigned long long dk0 = ph::desc(sK(kt % PH_STAGES), 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const unsigned long long qoff = ((kk >> 2) * (BR * 128) + (kk & 3) * 32) >> 4;
      const unsigned long long koff = ((kk >> 2) * (PH_BC * 128) + (kk & 3) * 32) >> 4;
      ph::wgmma_ss(s, dq0 + qoff, dk0 + koff, kk);
    }
    ph::wgmma_commit();
  };
  // O += P V_kt, issued and committed; V [keys x D] read N-major: leading byte offset = one
  // column block (64 d), stride = 8 keys (1024 bytes); k-step kk starts 16 keys further.
  auto issue_pv = [&](int kt, const unsigned (&p)[PH_BC / 16][4]) {
    const unsigned long long dv0 = ph::desc(sK(kt % PH_STAGES) + KV_BYTES, PH_BC * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < PH_BC / 16; ++kk) {
      ph::wgmma_rs(o, p[kk], dv0 + ((kk * 16 * 128) >> 4));
    }
    ph::wgmma_commit();
  };
  // Mask and online softmax of tile kt's scores (running max in raw score units; the scale folds
  // into one FFMA): P into `pn`, the row sums into l_run, the factor O must be rescaled by into
  // alpha. The masked scores and weights live in `v` (renamed registers, no copies); S itself
  // is only read. `masked` (a constant at each inlined call) only on the tiles that cross this
  // warpgroup's diagonal, the end of the keys or a sliding window's start: a key column is cut
  // when it lies past min(row position, last key) or before the row's window.
  auto softmax = [&](const bool masked, int kt, unsigned (&pn)[PH_BC / 16][4], float (&alpha)[2]) {
    float v[NS];
    float mx[2] = {kiln::neg_inf(), kiln::neg_inf()};
    int lim[2] = {0, 0}, low[2] = {0, 0};
    if (masked) {
      const int key0 = kt * PH_BC + (lane & 3) * 2;
      lim[0] = min(row_pos0, kv_end - 1) - key0;
      lim[1] = min(row_pos1, kv_end - 1) - key0;
      // A sliding window also cuts the columns before each row's first key.
      low[0] = window > 0 ? row_pos0 - window + 1 - key0 : -PH_BC;
      low[1] = window > 0 ? row_pos1 - window + 1 - key0 : -PH_BC;
    }
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      v[i] = s[i];
      if (masked) {
        const int col = (i >> 2) * 8 + (i & 1);
        if (col > lim[(i >> 1) & 1] || col < low[(i >> 1) & 1]) v[i] = kiln::neg_inf();
      }
      mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], v[i]);
    }
    float msc[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) kiln::quad_softmax_update(mx[r], sl2, m_run[r], alpha[r], msc[r]);
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      v[i] = kiln::exp2_ftz(fmaf(v[i], sl2, msc[(i >> 1) & 1]));
      rs[(i >> 1) & 1] += v[i];
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
#pragma unroll
    for (int kk = 0; kk < PH_BC / 16; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) pn[kk][e] = kiln::f2_to_bf2(v[8 * kk + 2 * e], v[8 * kk + 2 * e + 1]);
  };
  auto needs_mask = [&](int kt) {
    const int key0 = kt * PH_BC;
    return key0 + PH_BC - 1 > wg_first || key0 + PH_BC > kv_end ||
           (window > 0 && key0 <= wg_first + 63 - window);
  };
  auto softmax_tile = [&](int kt, unsigned (&pn)[PH_BC / 16][4], float (&alpha)[2]) {
    if (needs_mask(kt))
      softmax(true, kt, pn, alpha);
    else
      softmax(false, kt, pn, alpha);
  };
  auto release = [&](int kt) {
    __syncwarp();
    if (lane == 0) ph::bar_arrive(empty(kt % PH_STAGES));
  };

  ph::bar_wait(q_full, 0);
  ph::bar_wait(full(0), 0);
  ph::wgmma_fence();
  issue_scores(0);
  ph::wgmma_wait<0>();
  ph::fence_regs(s);
  {
    float alpha[2];
    softmax_tile(0, pa, alpha);  // O is still zero: nothing to rescale
  }
  // One pipelined step: S of tile kt and P·V of tile kt - 1 (P in `pc`) on the tensor cores,
  // then the softmax of tile kt into `pn`. Two P buffers alternate (unrolled by two): ptxas
  // serializes the wgmmas if an ordinary instruction (a copy) writes their A registers.
  auto step = [&](int kt, unsigned (&pc)[PH_BC / 16][4], unsigned (&pn)[PH_BC / 16][4]) {
    ph::bar_wait(full(kt % PH_STAGES), (kt / PH_STAGES) & 1);
    ph::fence_regs(o);
    ph::wgmma_fence();
    issue_scores(kt);
    issue_pv(kt - 1, pc);
    ph::wgmma_wait<1>();  // the scores of tile kt are in
    ph::fence_regs(s);
    float alpha[2];
    softmax_tile(kt, pn, alpha);
    ph::wgmma_wait<0>();  // P·V of tile kt - 1 is done: O and pc are free, its stage too
    ph::fence_regs(o);
#pragma unroll
    for (int kk = 0; kk < PH_BC / 16; ++kk) ph::fence_regs(pc[kk]);
    release(kt - 1);
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int i = 0; i < NO; ++i) o[i] *= alpha[(i >> 1) & 1];
    }
  };
  unsigned pb[PH_BC / 16][4];
  int kt = 1;
  for (; kt + 1 < nt; kt += 2) {
    step(kt, pa, pb);
    step(kt + 1, pb, pa);
  }
  if (kt < nt) {
    step(kt, pa, pb);
    ph::fence_regs(o);
    ph::wgmma_fence();
    issue_pv(nt - 1, pb);
  } else {
    ph::fence_regs(o);
    ph::wgmma_fence();
    issue_pv(nt - 1, pa);
  }
  ph::wgmma_wait<0>();
  ph::fence_regs(o);
  release(nt - 1);
  // Tiles past this warpgroup's rows: wait for each (an early release could otherwise complete
  // the stage's previous phase before the other consumer has released it), then release it.
  for (int sk = nt; sk < ntiles; ++sk) {
    ph::bar_wait(full(sk % PH_STAGES), (sk / PH_STAGES) & 1);
    release(sk);
  }
  // Normalize into this warpgroup's rows of the Q tile (free: its last S product has completed;
  // same swizzle, so the 4-byte writes of a warp hit 32 different banks), then store whole rows
  // with 16-byte coalesced writes.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    l_run[r] = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int rr = c * 64 + wq * 16 + (lane >> 2) + r * 8;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      ph::st_shared(sQ + ph::swz<BR>(rr, i) + (lane & 3) * 4,
                    kiln::f2_to_bf2(o[4 * i + 2 * r] * l_run[r], o[4 * i + 2 * r + 1] * l_run[r]));
    }
  }
  ph::wg_sync(1 + c);
  const int t = tid & 127;
#pragma unroll
  for (int j = 0; j < CH / 2; ++j) {
    const int idx = t + 128 * j, row = c * 64 + idx / CH, ch = idx % CH;
    if (q0 + row < q_len) {
      const uint4 val = ph::ld_shared16(sQ + ph::swz<BR>(row, ch));
      *reinterpret_cast<uint4*>(out + (long long)(qs + q0 + row) * (HEADS * D) + h * D + ch * 8) = val;
    }
  }
}
