// sampling.cu — next-token selection from f32 logits, one CTA per row (batch entry).
//
//   argmax(logits, V, out):   out[b] = index of the largest logits[b, :] (lowest index on ties;
//                             NaN never wins; an all -inf / NaN row gives 0)
//   sample(logits, V, temperature, top_k, top_p, seed_and_step, out):
//     per row b, with T = temperature[b], k = top_k[b], p = top_p[b]:
//       T <= 0 (or NaN): greedy, as argmax.
//       otherwise HF's order: probabilities softmax(logits / T); keep the tokens whose logit is
//       >= the k-th largest (ties kept; k <= 0 or k >= V: all); among those keep the smallest
//       set of most probable tokens whose mass reaches p (p >= 1: all); draw one token from the
//       kept set in proportion to its probability.
//     The uniform draw is counter-based: u = splitmix64(seed ^ splitmix64(step)) (top 24 bits),
//     seed = seed_and_step[2b], step = seed_and_step[2b+1], so a sequence's draws depend on its
//     own seed and step only, not on its place in the batch, and replaying a step replays its draw.
//     Selection is sorting-free: radix select over the order-preserving integer keys of the
//     logits (4 passes of 8 bits, counts for top-k, probability mass for top-p), then an inverse-CDF
//     walk over contiguous per-thread chunks; if rounding leaves no chunk holding the draw, the
//     argmax (always kept) is taken.
//
// Layouts: logits [B, V] f32 row-major; temperature, top_p [B] f32; top_k [B] int32;
// seed_and_step [B, 2] u64; out [B] int32. Any V >= 1.
// Launch: both grid (B), block SAMPLE_THREADS (1024), no dynamic shared memory.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define ARGMAX_UNROLL 8

namespace smp {

__device__ __forceinline__ bool better(float av, int ai, float bv, int bi) {
  return av > bv || (av == bv && ai < bi);
}

// Block-wide argmax; every thread gets the result.
__device__ __forceinline__ int block_argmax(const float* __restrict__ row, int V, float* out_val) {
  __shared__ float sv[32];
  __shared__ int si[32];
  float bv = kiln::neg_inf();
  int bi = 0x7fffffff;
  // Each thread visits its indices in increasing order, so the strict `>` keeps the lowest index
  // among equal values. ARGMAX_UNROLL independent loads are in flight per thread (float4 when the
  // rows are 16-byte aligned): a single CTA then reads a 128K-entry row in a few microseconds.
  if ((V & 3) == 0 && (reinterpret_cast<unsigned long long>(row) & 15) == 0) {
    const float4* r4 = reinterpret_cast<const float4*>(row);
    const int nv = V >> 2;
    for (int b0 = threadIdx.x; b0 < nv; b0 += blockDim.x * ARGMAX_UNROLL) {
      float4 v[ARGMAX_UNROLL];
#pragma unroll
      for (int u = 0; u < ARGMAX_UNROLL; ++u) {
        const int i = b0 + u * blockDim.x;
        v[u] = i < nv ? __ldg(r4 + i) : make_float4(kiln::neg_inf(), kiln::neg_inf(), kiln::neg_inf(), kiln::neg_inf());
      }
#pragma unroll
      for (int u = 0; u < ARGMAX_UNROLL; ++u) {
        const int i = 4 * (b0 + u * blockDim.x);
        if (v[u].x > bv) { bv = v[u].x; bi = i; }
        if (v[u].y > bv) { bv = v[u].y; bi = i + 1; }
        if (v[u].z > bv) { bv = v[u].z; bi = i + 2; }
        if (v[u].w > bv) { bv = v[u].w; bi = i + 3; }
      }
    }
  } else {
    for (int b0 = threadIdx.x; b0 < V; b0 += blockDim.x * ARGMAX_UNROLL) {
      float v[ARGMAX_UNROLL];
#pragma unroll
      for (int u = 0; u < ARGMAX_UNROLL; ++u) {
        const int i = b0 + u * blockDim.x;
        v[u] = i < V ? row[i] : kiln::neg_inf();
      }
#pragma unroll
      for (int u = 0; u < ARGMAX_UNROLL; ++u)
        if (v[u] > bv) { bv = v[u]; bi = b0 + u * blockDim.x; }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
  __syncthreads();
  const int nw = blockDim.x >> 5;
  bv = lane < nw ? sv[lane] : kiln::neg_inf();
  bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
  }
  *out_val = bv;
  return bi == 0x7fffffff ? 0 : bi;
}

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Warp 0 scans 256 histogram bins from the top (bin 255) down and finds the first bin at which
// the running total reaches `target` (a bin holding something). Writes the bin and the total of
// the bins above it. With float masses, rounding can leave no bin reaching the target: then the
// lowest non-empty bin is taken (everything is kept).
template <typename Tv>
__device__ __forceinline__ void find_bin(const Tv* hist, Tv target, int* out_bin, Tv* out_above) {
  const int lane = threadIdx.x & 31;
  Tv c[8];
  Tv sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) { c[j] = hist[255 - 8 * lane - j]; sum += c[j]; }
  Tv incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const Tv n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  const Tv excl = incl - sum;
  const unsigned reach = __ballot_sync(0xffffffffu, sum > 0 && incl >= target);
  const unsigned nonempty = __ballot_sync(0xffffffffu, sum > 0);
  int src;
  if (reach) src = __ffs(reach) - 1;
  else if (nonempty) src = 31 - __clz(nonempty);
  else src = 31;
  if (lane == src) {
    Tv cum = excl;
    int bin = 255 - 8 * lane - 7, last_bin = -1;
    Tv above = cum, last_above = cum;
    bool found = false;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (!found && c[j] > 0) {
        if (cum + c[j] >= target) {
          bin = 255 - 8 * lane - j;
          above = cum;
          found = true;
        } else {
          last_bin = 255 - 8 * lane - j;
          last_above = cum;
          cum += c[j];
        }
      }
    }
    if (!found && last_bin >= 0) { bin = last_bin; above = last_above; }
    *out_bin = bin;
    *out_above = above;
  }
}

}  // namespace smp

__global__ void __launch_bounds__(SAMPLE_THREADS)
argmax(const float* __restrict__ logits, int V, int* __restrict__ out) {
  kiln::pdl_sync();
  const float* row = logits + (long long)blockIdx.x * V;
  float v;
  const int i = smp::block_argmax(row, V, &v);
  if (threadIdx.x == 0) out[blockIdx.x] = i;
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
sample(const float* __restrict__ logits, int V, const float* __restrict__ temperature,
       const int* __restrict__ top_k, const float* __restrict__ top_p,
       const unsigned long long* __restrict__ seed_and_step, int* __restrict__ out) {
  kiln::pdl_sync();
  __shared__ unsigned s_cnt[256];
  __shared__ float s_mass[256];
  __shared__ int s_bin;
  __shared__ unsigned s_above_u;
  __shared__ float s_above_f;
  __shared__ float s_scan[32];
  __shared__ int s_choice;
  __shared__ float s_red[32];

  const int b = blockIdx.x, tid = threadIdx.x;
  const float* row = logits + (long long)b * V;
  float mval;
  const int amax = smp::block_argmax(row, V, &mval);
  const float T = temperature[b];
  if (!(T > 0.f) || !(mval > kiln::neg_inf())) {
    if (tid == 0) out[b] = amax;
    return;
  }
  const float invT = 1.f / T;
  const int k = top_k[b];
  const float p = top_p[b];

  // Top-k: the key of the k-th largest logit (radix select on counts).
  unsigned thr = 0;
  if (k > 0 && k < V) {
    unsigned prefix = 0, remaining = (unsigned)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      if (tid < 256) s_cnt[tid] = 0;
      __syncthreads();
      const unsigned hi = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
      for (int i = tid; i < V; i += SAMPLE_THREADS) {
        const unsigned key = kiln::float_key(row[i]);
        if ((key & hi) == prefix) atomicAdd(&s_cnt[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid < 32) smp::find_bin<unsigned>(s_cnt, remaining, &s_bin, &s_above_u);
      __syncthreads();
      prefix |= (unsigned)s_bin << shift;
      remaining -= s_above_u;
    }
    thr = prefix;
  }

  // Top-p: the key at which the descending cumulative mass of the kept tokens reaches p·Z.
  if (p < 1.f) {
    float z = 0.f;
    for (int i = tid; i < V; i += SAMPLE_THREADS) {
      const float l = row[i];
      if (kiln::float_key(l) >= thr) z += __expf((l - mval) * invT);
    }
    z = kiln::block_sum(z, s_red);
    float target = fmaxf(p, 0.f) * z;
    unsigned prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      if (tid < 256) s_mass[tid] = 0.f;
      __syncthreads();
      const unsigned hi = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
      for (int i = tid; i < V; i += SAMPLE_THREADS) {
        const float l = row[i];
        const unsigned key = kiln::float_key(l);
        if (key >= thr && (key & hi) == prefix)
          atomicAdd(&s_mass[(key >> shift) & 255u], __expf((l - mval) * invT));
      }
      __syncthreads();
      if (tid < 32) smp::find_bin<float>(s_mass, target, &s_bin, &s_above_f);
      __syncthreads();
      prefix |= (unsigned)s_bin << shift;
      target -= s_above_f;
    }
    thr = max(thr, prefix);
  }

  // Inverse CDF over contiguous chunks in index order.
  const int chunk = (V + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
  const int c0 = min(V, tid * chunk), c1 = min(V, c0 + chunk);
  float mine = 0.f;
  for (int i = c0; i < c1; ++i) {
    const float l = row[i];
    if (kiln::float_key(l) >= thr) mine += __expf((l - mval) * invT);
  }
  // Exclusive block scan of the chunk sums.
  const int lane = tid & 31, warp = tid >> 5;
  float incl = mine;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) s_scan[warp] = incl;
  if (tid == 0) s_choice = 0x7fffffff;
  __syncthreads();
  if (warp == 0) {
    float w = s_scan[lane];
    float wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float n = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += n;
    }
    s_scan[lane] = wi - w;  // exclusive prefix of the warps
    if (lane == 31) s_red[0] = wi;  // total
  }
  __syncthreads();
  const float total = s_red[0];
  const float before = s_scan[warp] + incl - mine;
  const unsigned long long seed = seed_and_step[2 * b], step = seed_and_step[2 * b + 1];
  const float u = (float)(smp::splitmix64(seed ^ smp::splitmix64(step)) >> 40) * (1.0f / 16777216.0f);
  const float target = u * total;
  if (mine > 0.f && target >= before && target < before + mine) {
    float run = before;
    int pick = -1, last = -1;
    for (int i = c0; i < c1; ++i) {
      const float l = row[i];
      if (kiln::float_key(l) >= thr) {
        run += __expf((l - mval) * invT);
        last = i;
        if (target < run) { pick = i; break; }
      }
    }
    if (pick < 0) pick = last;
    atomicMin(&s_choice, pick);
  }
  __syncthreads();
  if (tid == 0) out[b] = s_choice == 0x7fffffff ? amax : s_choice;
}
