// elementwise.cu — epilogues of the prefill GEMMs (cuBLAS computes the products).
//
//   add_inplace(out, r, n):      out[i] = bf16(out[i] + r[i])                 for i < n
//   silu_mul<F>(gu, out, T):     out[t,f] = bf16(silu(gu[t,f]) * gu[t,F+f])   for t < T, f < F
//                                (gu: [T, 2F] = gate then up, the fused gate_up GEMM's output)
//
// All bf16, f32 arithmetic, one rounding. add_inplace: any n (16-byte vectors where 8-aligned, a
// scalar tail), out and r 16-byte aligned. silu_mul: F % 8 == 0, 16-byte aligned rows.
// Launch (both grid-stride): block ELEMENTWISE_THREADS (256), grid min(ceil(work / 256), 8192)
// where work = ceil(n / 8) for add_inplace and T * F / 8 for silu_mul.
#include "common.cuh"

#define ELEMENTWISE_THREADS 256

__global__ void __launch_bounds__(ELEMENTWISE_THREADS)
add_inplace(bf16* out, const bf16* r, long long n) {
  kiln::pdl_sync();
  const long long nv = n / 8;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  uint4* o4 = reinterpret_cast<uint4*>(out);
  const uint4* r4 = reinterpret_cast<const uint4*>(r);
  for (long long v = i; v < nv; v += stride) {
    float a[8], b[8];
    kiln::unpack8(o4[v], a);
    kiln::unpack8(r4[v], b);
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] += b[j];
    o4[v] = kiln::pack8(a);
  }
  for (long long e = nv * 8 + i; e < n; e += stride)
    out[e] = __float2bfloat16_rn(__bfloat162float(out[e]) + __bfloat162float(r[e]));
}

template <int F>
__global__ void __launch_bounds__(ELEMENTWISE_THREADS)
silu_mul(const bf16* __restrict__ gu, bf16* __restrict__ out, int T) {
  kiln::pdl_sync();
  static_assert(F % 8 == 0, "silu_mul: F must be a multiple of 8");
  constexpr int FV = F / 8;
  const long long total = (long long)T * FV;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < total; v += stride) {
    const long long t = v / FV;
    const int c = (int)(v - t * FV);
    const bf16* row = gu + t * (2LL * F);
    float g[8], u[8];
    kiln::unpack8(kiln::ld_cached16(row + c * 8), g);
    kiln::unpack8(kiln::ld_cached16(row + F + c * 8), u);
#pragma unroll
    for (int j = 0; j < 8; ++j) g[j] = g[j] / (1.f + __expf(-g[j])) * u[j];
    reinterpret_cast<uint4*>(out + t * F)[c] = kiln::pack8(g);
  }
}
