// What the two W4A16 CUDA kernels share (w4a16_mma.cu for sm_80+, w4a16_wgmma.cu for
// sm_90a): strata.model.quant's packed format, the nibble-to-float unpack, cp.async, the problem
// record and the split-K sum. Each .cu includes it once (one translation unit a library).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int GROUP = 64;   // k per quantization group (one K step)
constexpr int CHUNK = 8;    // groups per scale load, and the split-K granularity

template <typename T> struct Codes;
template <> struct Codes<__nv_bfloat16> {  // 0x4300 | q = 128 + q; 1.0; -128.0
  static constexpr uint32_t MAGIC = 0x43004300u, ONE = 0x3f803f80u, NEG = 0xc300c300u;
};
template <> struct Codes<__half> {  // 0x6400 | q = 1024 + q; 1.0; -1024.0
  static constexpr uint32_t MAGIC = 0x64006400u, ONE = 0x3c003c00u, NEG = 0xe400e400u;
};

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ uint32_t codes(uint32_t t, uint32_t magic) {  // (t & 0x000f000f) | magic
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(t), "n"(0x000f000f), "r"(magic));
  return d;
}

template <typename T> __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c);
template <> __device__ __forceinline__ uint32_t fma2<__nv_bfloat16>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
template <> __device__ __forceinline__ uint32_t fma2<__half>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }

template <typename T> __device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&lo)) |
         (static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&hi)) << 16);
}

template <typename T> __device__ __forceinline__ uint32_t splat(float v);  // (v, v) rounded, one cvt
template <> __device__ __forceinline__ uint32_t splat<__nv_bfloat16>(float v) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(v, v);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t splat<__half>(float v) {
  const __half2 h = __floats2half2_rn(v, v);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}
// The same, asking L2 to fetch the 128 bytes around it from DRAM: a weight row is read
// 32 bytes a group, and the next groups of the row are then already in L2.
__device__ __forceinline__ void cp_async16_l2(void* smem, const void* gmem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

struct Problem {
  const void* x;
  long ldx;
  const uint8_t* w;
  const __half* scale;
  const __half* wmin;
  const void* bias;  // [N] in X's dtype, or null
  void* y;           // [M, N] in X's dtype (one split)
  float* part;       // [splits, M, N] (several splits)
  int m, n, k, chunks_per_split;
};

// The block's packed weights (BN rows x 32 bytes a group) through an NSTAGE-deep cp.async
// ring, and scale and min CHUNK groups at a time into two buffers. Thread pairs share a
// row: thread 2r + h copies bytes 16h..16h+15 of rows r, r + THREADS/2, ... (and of scale,
// h = 0, or min, h = 1).
template <int BN, int THREADS, int NSTAGE> struct WeightRing {
  static constexpr int W_BYTES = NSTAGE * BN * 32;
  static constexpr int S_BYTES = 2 * BN * CHUNK * 2;  // two chunks of scale (and again of min)
  static constexpr int BYTES = W_BYTES + 2 * S_BYTES;
  static_assert(BN * 2 % THREADS == 0, "whole rows a thread pair");

  uint8_t* ws;
  __half* ss;
  __half* ms;
  const uint8_t* w_src;  // this thread's first cp.async piece of W, group g0
  const __half* s_src;   // and of scale (odd threads: of min)

  __device__ WeightRing(unsigned char* smem, const Problem& p, int n0, int g0)
      : ws(smem), ss(reinterpret_cast<__half*>(smem + W_BYTES)),
        ms(reinterpret_cast<__half*>(smem + W_BYTES + S_BYTES)) {
    const int r = threadIdx.x >> 1, h = threadIdx.x & 1;
    w_src = p.w + static_cast<long>(n0 + r) * (p.k / 2) + g0 * 32 + h * 16;
    const __half* src = h ? p.wmin : p.scale;
    s_src = src + static_cast<long>(n0 + r) * (p.k / GROUP) + g0;
  }

  __device__ void load_weights(const Problem& p, int i, int st) {  // group g0 + i into stage st
    const int r = threadIdx.x >> 1, h = threadIdx.x & 1;
#pragma unroll
    for (int it = 0; it < BN * 2 / THREADS; ++it) {
      const long row = r + it * (THREADS / 2);
      cp_async16_l2(ws + (st * BN + row) * 32 + h * 16, w_src + (row - r) * (p.k / 2) + i * 32);
    }
  }

  __device__ void load_scales(const Problem& p, int chunk, int b) {  // CHUNK groups of scale and min into buffer b
    const int r = threadIdx.x >> 1, h = threadIdx.x & 1;
#pragma unroll
    for (int it = 0; it < BN * 2 / THREADS; ++it) {
      const long row = r + it * (THREADS / 2);
      cp_async16((h ? ms : ss) + (b * BN + row) * CHUNK, s_src + (row - r) * (p.k / GROUP) + chunk * CHUNK);
    }
  }
};

// The registers for one weight word (8 k of one row, k0 in byte 0's high nibble): (k0, k1), (k2, k3), (k4, k5), (k6, k7). prmt puts byte i's high nibble (from
// q >> 4) and low nibble (from q) at the bottom of the two 16-bit lanes.
template <typename T> __device__ __forceinline__ void dequant_word(uint32_t q, uint32_t s2, uint32_t m2,
                                                                   uint32_t (&b)[4]) {
  const uint32_t hi = q >> 4;
  const uint32_t c[4] = {codes(prmt(hi, q, 0x4400), Codes<T>::MAGIC), codes(prmt(hi, q, 0x5511), Codes<T>::MAGIC),
                         codes(prmt(hi, q, 0x6622), Codes<T>::MAGIC), codes(prmt(hi, q, 0x7733), Codes<T>::MAGIC)};
#pragma unroll
  for (int i = 0; i < 4; ++i) b[i] = fma2<T>(fma2<T>(c[i], Codes<T>::ONE, Codes<T>::NEG), s2, m2);
}

template <typename T>
__global__ void splitk_sum_kernel(const float* __restrict__ part, const T* __restrict__ bias, T* __restrict__ y,
                                  int m, int n, int splits) {
  const long i = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) * 2;  // two columns a thread
  const long mn = static_cast<long>(m) * n;
  if (i >= mn) return;
  float v0 = 0.f, v1 = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float2 v = *reinterpret_cast<const float2*>(part + s * mn + i);
    v0 += v.x;
    v1 += v.y;
  }
  if (bias != nullptr) {
    const int col = static_cast<int>(i % n);
    v0 += static_cast<float>(bias[col]);
    v1 += static_cast<float>(bias[col + 1]);
  }
  *reinterpret_cast<uint32_t*>(y + i) = pack2(from_float<T>(v0), from_float<T>(v1));
}

// Sums the splits' fp32 partials [splits, m, n] into y [m, n] (plus bias), on `stream`.
template <typename T> void launch_splitk_sum(const Problem& p, int splits, cudaStream_t stream) {
  const long pairs = static_cast<long>(p.m) * p.n / 2;
  splitk_sum_kernel<T><<<static_cast<unsigned>((pairs + 255) / 256), 256, 0, stream>>>(
      p.part, static_cast<const T*>(p.bias), static_cast<T*>(p.y), p.m, p.n, splits);
}

}  // namespace
