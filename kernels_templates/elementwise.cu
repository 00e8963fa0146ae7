// elementwise.cu — epilogues of the prefill GEMM (cuBLAS computes the product; the residual add
// rides on cuBLAS's beta = 1, and so does a bias, once its rows are in the output).
//
//   silu_mul<F>(gu, out, T):     out[t,f] = bf16(silu(gu[t,f]) * gu[t,F+f])   for t < T, f < F
//                                (gu: [T, 2F] = gate then up, the fused gate_up GEMM's output)
//   gelu_mul<F>(gu, out, T):     the same with GELU's tanh approximation (GeGLU: Gemma)
//   bias_rows<N>(bias, out, T):  out[t,n] = bias[n]                            for t < T, n < N
//                                (bias [N]; the GEMM then adds x·wᵀ with beta = 1, one rounding)
//
// bf16, f32 arithmetic, one rounding. F % 8 == 0 and N % 8 == 0, 16-byte aligned rows.
// Launch (grid-stride): block ELEMENTWISE_THREADS (256), grid min(ceil(T * F / 8 / 256), 8192).
#include "common.cuh"

#define ELEMENTWISE_THREADS 256

// out = act(gate) * up over [T, F] (kiln::gate_act).
template <int F, int ACT>
__device__ __forceinline__ void gated_rows(const bf16* __restrict__ gu, bf16* __restrict__ out, int T) {
  kiln::pdl_sync();
  static_assert(F % 8 == 0, "silu_mul/gelu_mul: F must be a multiple of 8");
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
    for (int j = 0; j < 8; ++j) g[j] = kiln::gate_act<ACT>(g[j]) * u[j];
    reinterpret_cast<uint4*>(out + t * F)[c] = kiln::pack8(g);
  }
}

template <int F>
__global__ void __launch_bounds__(ELEMENTWISE_THREADS)
silu_mul(const bf16* __restrict__ gu, bf16* __restrict__ out, int T) {
  gated_rows<F, 0>(gu, out, T);
}

template <int F>
__global__ void __launch_bounds__(ELEMENTWISE_THREADS)
gelu_mul(const bf16* __restrict__ gu, bf16* __restrict__ out, int T) {
  gated_rows<F, 1>(gu, out, T);
}

template <int N>
__global__ void __launch_bounds__(ELEMENTWISE_THREADS)
bias_rows(const bf16* __restrict__ bias, bf16* __restrict__ out, int T) {
  kiln::pdl_sync();
  static_assert(N % 8 == 0, "bias_rows: N must be a multiple of 8");
  constexpr int NV = N / 8;
  const long long total = (long long)T * NV;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < total; v += stride) {
    const long long t = v / NV;
    const int c = (int)(v - t * NV);
    reinterpret_cast<uint4*>(out + t * N)[c] = kiln::ld_cached16(bias + c * 8);
  }
}
