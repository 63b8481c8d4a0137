// W4A16 linear at decode sizes on Hopper's wgmma: Y[M, N] = X[M, K] @ W^T (+ bias), M <= 64.
//
// Why (ncu, bench/results/2026-11-27-run56*): w4a16_mma.cu is bound by mma.sync's issue
// rate at 64 rows: 64 HMMA among ~410 instructions a group a warp, most of the rest
// loading X's fragments. Here the product is transposed, Y^T = W X^T, so that the weights
// are wgmma's A operand, dequantized in registers (as in w4a16_mma.cu), and X^T is its B
// operand, read by the tensor cores from shared memory with no instruction per fragment.
// wgmma is asynchronous: a warpgroup dequantizes group i+1 while group i multiplies.
//
// Layout (strata.quant's format, read as stored): W [N, K/2] uint8, even k in the high
// nibble; scale, min [N, K/64] fp16, w = q*s + m. X [M, K] bf16 or fp16, row stride ldx.
// X's tile goes to shared memory as it is, by cp.async, in wgmma's K-major no-swizzle
// layout: 8x8 core matrices of 128 bytes, the two k halves of a k16 step 128 bytes apart
// (LBO), row octets 256 bytes apart (SBO). A thread (g = lane/4, t = lane%4) of warp w
// of a warpgroup holds, for its m64 tile, weight rows 16w+g and 16w+g+8; its A registers
// for k16 step s are k 16s+2t, +1 and 16s+2t+8, +9, which are bytes 8s/2+t.. of the row's
// group: every fourth byte, from t. It reads the row's 32 bytes and gathers its 8 with
// prmt, so the k order is wgmma's own and nothing is reshuffled in memory.
// (An earlier version permuted k to read 8 contiguous bytes and staged X through
// registers in the matching order; that staging cost ~40% of the time, run 62.)
//
// Block: WG warpgroups, each TM m64 tiles of output columns (BN = 64 * TM * WG), by all 64
// rows of X (wgmma's n = 64; rows past M are zero-filled). K is walked one group at a
// time, one barrier a group. A group's weights (WeightRing) and X tile share an NSTAGE
// cp.async ring, filled NSTAGE - 2 groups ahead: a stage is refilled two groups after its
// wgmma was issued, when every warpgroup has waited for it. Split-K as in w4a16_mma.cu.
#include "w4a16_common.cuh"

namespace {

constexpr int TOKENS = 64;                    // wgmma's n: rows of X, zero-padded
constexpr int STEP_BYTES = TOKENS * 16 * 2;   // X's k16 slice (2 KB)
constexpr int X_TILE = 4 * STEP_BYTES;        // X's group (8 KB)

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Plain stores to shared memory become visible to wgmma (the async proxy) only after this.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Keeps the compiler from moving accumulator registers across wgmma's asynchronous use.
__device__ __forceinline__ void fence_operands(float (&d)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The compiler sees wgmma's read of its A registers end with the asm statement; this use
// keeps them allocated until the wait that retires it, so the next group's A registers
// are other ones (else ptxas serializes the wgmma, warning C7513).
template <int TM> __device__ __forceinline__ void keep_live(const uint32_t (&a)[TM][4][4]) {
#pragma unroll
  for (int tm = 0; tm < TM; ++tm)
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int r = 0; r < 4; ++r) asm volatile("" ::"r"(a[tm][s][r]));
}

// Shared-memory matrix descriptor: start address, LBO 128 B, SBO 256 B, no swizzle.
__device__ __forceinline__ uint64_t x_desc(const unsigned char* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return static_cast<uint64_t>((a & 0x3FFFF) >> 4) | (static_cast<uint64_t>(128 >> 4) << 16) |
         (static_cast<uint64_t>(256 >> 4) << 32);
}

// D[64 x 64] += A[64 x 16] (registers) * B[16 x 64] (shared memory, K-major), fp32 D.
#define STRATA_WGMMA_M64N64K16(TY)                                                                           \
  asm volatile(                                                                                              \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                          \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                           \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "   \
      "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),    \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),           \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),         \
        "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),         \
        "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                                               \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))

template <typename T> __device__ __forceinline__ void wgmma(float (&d)[32], const uint32_t (&a)[4], uint64_t desc);
template <> __device__ __forceinline__ void wgmma<__nv_bfloat16>(float (&d)[32], const uint32_t (&a)[4],
                                                                 uint64_t desc) {
  STRATA_WGMMA_M64N64K16("bf16");
}
template <> __device__ __forceinline__ void wgmma<__half>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  STRATA_WGMMA_M64N64K16("f16");
}
#undef STRATA_WGMMA_M64N64K16

// X's group gk into a stage, by 16-byte cp.async: piece c (k 8c..8c+7) of row r lands in
// row r%8 of the core matrix at step c/2, half c%2, row octet r/8. Rows past M are zeros
// (a zero-byte source).
template <int THREADS> __device__ __forceinline__ void load_x(const Problem& p, int gk, unsigned char* xs) {
#pragma unroll
  for (int it = 0; it < TOKENS * 8 / THREADS; ++it) {
    const int piece = threadIdx.x + it * THREADS, row = piece >> 3, c = piece & 7;
    const uint16_t* src = static_cast<const uint16_t*>(p.x) + (row < p.m ? row * p.ldx : 0) +
                          static_cast<long>(gk) * GROUP + 8 * c;
    cp_async16_zfill(xs + (c >> 1) * STEP_BYTES + (row >> 3) * 256 + (c & 1) * 128 + (row & 7) * 16, src,
                     row < p.m ? 16 : 0);
  }
}

template <int WG, int TM, int NSTAGE> struct Tile {
  static constexpr int THREADS = WG * 128;
  static constexpr int BN = WG * TM * 64;
  using Ring = WeightRing<BN, THREADS, NSTAGE>;
  static constexpr int X_BYTES = NSTAGE * X_TILE;
  static constexpr int SMEM = X_BYTES + Ring::BYTES;
};

// Bytes t, t+4, ..., t+28 of a 32-byte group row: (words 0-3's byte t, words 4-7's byte t).
__device__ __forceinline__ uint2 gather_bytes(uint4 lo, uint4 hi, int t) {
  const uint32_t sel = t | ((t + 4) << 4);  // byte t of the first word, then of the second
  return make_uint2(prmt(prmt(lo.x, lo.y, sel), prmt(lo.z, lo.w, sel), 0x5410),
                    prmt(prmt(hi.x, hi.y, sel), prmt(hi.z, hi.w, sel), 0x5410));
}

// The thread's A registers for group gl of its TM tiles: a[tm][s] for k16 step s.
template <typename T, int BN, int TM, typename Ring>
__device__ __forceinline__ void dequant_group(const Ring& ring, int st, int sb, int gl, uint32_t (&a)[TM][4][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = (threadIdx.x >> 7) * TM * 64 + ((threadIdx.x >> 5) & 3) * 16 + g;
#pragma unroll
  for (int tm = 0; tm < TM; ++tm) {
    uint2 q[2];
    uint32_t s2[2], m2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows g and g + 8 of the warp's 16
      const int r = row0 + tm * 64 + 8 * h;
      const uint4* row = reinterpret_cast<const uint4*>(ring.ws + (st * BN + r) * 32);
      q[h] = gather_bytes(row[0], row[1], t);
      s2[h] = splat<T>(__half2float(ring.ss[(sb * BN + r) * CHUNK + gl]));
      m2[h] = splat<T>(__half2float(ring.ms[(sb * BN + r) * CHUNK + gl]));
    }
#pragma unroll
    for (int wd = 0; wd < 2; ++wd) {  // k 32wd + 2t + {0, 1, 8, 9, 16, 17, 24, 25}: steps 2wd and 2wd + 1
      uint32_t b0[4], b1[4];
      dequant_word<T>(wd ? q[0].y : q[0].x, s2[0], m2[0], b0);
      dequant_word<T>(wd ? q[1].y : q[1].x, s2[1], m2[1], b1);
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        a[tm][2 * wd + u][0] = b0[2 * u];
        a[tm][2 * wd + u][1] = b1[2 * u];
        a[tm][2 * wd + u][2] = b0[2 * u + 1];
        a[tm][2 * wd + u][3] = b1[2 * u + 1];
      }
    }
  }
}

template <typename T, int TM>
__device__ __forceinline__ void issue_group(const unsigned char* xs, const uint32_t (&a)[TM][4][4],
                                            float (&acc)[TM][32]) {
  uint64_t desc[4];  // made before the fence: no other instruction may define a wgmma input between it and the commit
#pragma unroll
  for (int s = 0; s < 4; ++s) desc[s] = x_desc(xs + s * STEP_BYTES);
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int tm = 0; tm < TM; ++tm) wgmma<T>(acc[tm], a[tm][s], desc[s]);
  wgmma_commit();
}

// Accumulator d[4j + 2h + e] of tile tm is output column (weight row) 16w + g + 8h of the
// tile, X row 8j + 2t + e.
template <typename T, int TM>
__device__ __forceinline__ void store(const Problem& p, int n0, const float (&acc)[TM][32]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int col0 = n0 + (threadIdx.x >> 7) * TM * 64 + ((threadIdx.x >> 5) & 3) * 16 + g;
  const bool partial = gridDim.y > 1;
#pragma unroll
  for (int tm = 0; tm < TM; ++tm) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = col0 + tm * 64 + 8 * h;
      const float b = (!partial && p.bias != nullptr) ? static_cast<float>(static_cast<const T*>(p.bias)[col]) : 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = 8 * j + 2 * t + e;
          if (row >= p.m) continue;
          const float v = acc[tm][4 * j + 2 * h + e];
          if (partial) {
            p.part[(static_cast<long>(blockIdx.y) * p.m + row) * p.n + col] = v;
          } else {
            static_cast<T*>(p.y)[static_cast<long>(row) * p.n + col] = from_float<T>(v + b);
          }
        }
      }
    }
  }
}

template <typename T, int WG, int TM, int NSTAGE>
__global__ void __launch_bounds__(WG * 128, 1) w4a16_wgmma_kernel(const __grid_constant__ Problem p) {
  extern __shared__ __align__(128) unsigned char smem[];
  using TileT = Tile<WG, TM, NSTAGE>;
  const int n0 = blockIdx.x * TileT::BN;
  const int chunks = p.k / (GROUP * CHUNK);
  const int c0 = blockIdx.y * p.chunks_per_split;
  const int groups = (min(c0 + p.chunks_per_split, chunks) - c0) * CHUNK;
  const int g0 = c0 * CHUNK;
  typename TileT::Ring ring(smem + TileT::X_BYTES, p, n0, g0);
  float acc[TM][32];
#pragma unroll
  for (int tm = 0; tm < TM; ++tm)
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[tm][e] = 0.f;

  // cp.async commit j holds group j (weights and X); chunk c+1's scales ride with the
  // commit made at group 8c. Group i's stage i % NSTAGE is refilled at step i + 2.
  ring.load_scales(p, 0);
#pragma unroll
  for (int j = 0; j < NSTAGE - 2; ++j) {
    if (j < groups) {
      ring.load_weights(p, j, j);
      load_x<TileT::THREADS>(p, g0 + j, smem + j * X_TILE);
    }
    cp_async_commit();
  }

  uint32_t a[2][TM][4][4];  // group i's A registers: a[i & 1] (wgmma reads them until group i + 1 is waited on)
  int st = 0, fill = NSTAGE - 2;  // stages: computed (i % NSTAGE), refilled ((i - 2) % NSTAGE)
  auto step = [&](int i, uint32_t(&ai)[TM][4][4], const uint32_t(&prev)[TM][4][4]) {
    cp_async_wait<NSTAGE - 3>();
    fence_proxy_async();  // this thread's cp.async writes, made visible to wgmma
    __syncthreads();
    if (i + NSTAGE - 2 < groups) {
      ring.load_weights(p, i + NSTAGE - 2, fill);
      load_x<TileT::THREADS>(p, g0 + i + NSTAGE - 2, smem + fill * X_TILE);
    }
    if (i % CHUNK == 0 && i + CHUNK < groups) ring.load_scales(p, i / CHUNK + 1);
    cp_async_commit();
    dequant_group<T, TileT::BN, TM>(ring, st, (i / CHUNK) & 1, i % CHUNK, ai);
    issue_group<T, TM>(smem + st * X_TILE, ai, acc);
    wgmma_wait<1>();  // group i - 1 is done: its A registers and stage are free
    keep_live<TM>(prev);
    fill = fill + 1 == NSTAGE ? 0 : fill + 1;
    st = st + 1 == NSTAGE ? 0 : st + 1;
  };
  int i = 0;
  do {  // groups is a positive multiple of CHUNK, so even
    step(i, a[0], a[1]);
    step(i + 1, a[1], a[0]);
    i += 2;
  } while (i < groups);
  wgmma_wait<0>();
#pragma unroll
  for (int tm = 0; tm < TM; ++tm) fence_operands(acc[tm]);
  store<T, TM>(p, n0, acc);
}

template <typename T, int WG, int TM, int NSTAGE> cudaError_t launch(const Problem& p, int splits, cudaStream_t stream) {
  using TileT = Tile<WG, TM, NSTAGE>;
  auto kernel = w4a16_wgmma_kernel<T, WG, TM, NSTAGE>;
  static bool configured = false;  // the opt-in above 48 KB of shared memory, once per kernel
  if (!configured) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TileT::SMEM);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  dim3 grid(p.n / TileT::BN, splits);
  kernel<<<grid, TileT::THREADS, TileT::SMEM, stream>>>(p);
  if (splits > 1) launch_splitk_sum<T>(p, splits, stream);
  return cudaGetLastError();
}

template <typename T> cudaError_t launch_shape(const Problem& p, int wg, int tm, int stages, int splits,
                                               cudaStream_t stream) {
  if (wg == 1 && tm == 2 && stages == 6) return launch<T, 1, 2, 6>(p, splits, stream);
  if (wg == 2 && tm == 1 && stages == 6) return launch<T, 2, 1, 6>(p, splits, stream);
  if (wg == 2 && tm == 1 && stages == 8) return launch<T, 2, 1, 8>(p, splits, stream);
  if (wg == 2 && tm == 2 && stages == 6) return launch<T, 2, 2, 6>(p, splits, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

// dtype: 0 bfloat16, 1 float16; (wg, tm, stages): (1, 2, 6), (2, 1, 6), (2, 1, 8) or
// (2, 2, 6). Preconditions (checked by the caller, w4a16_mma.py): 0 < m <= 64; n a
// multiple of 64 * tm * wg; k a multiple of 512; all pointers 16-byte aligned, w, scale,
// min and y contiguous, x's rows ldx elements apart (ldx a multiple of 8); `part` holds
// splits * m * n floats when splits > 1; splits = ceil(k / 512 / chunks_per_split).
// Returns a cudaError_t (0: launched).
extern "C" int strata_w4a16_wgmma(int dtype, int wg, int tm, int stages, const void* x, long ldx, const void* w,
                                  const void* scale, const void* wmin, const void* bias, void* y, void* part, int m,
                                  int n, int k, int chunks_per_split, int splits, void* stream) {
  Problem p{x,  ldx, static_cast<const uint8_t*>(w), static_cast<const __half*>(scale),
            static_cast<const __half*>(wmin), bias, y, static_cast<float*>(part), m, n, k, chunks_per_split};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e = dtype == 0 ? launch_shape<__nv_bfloat16>(p, wg, tm, stages, splits, s)
                             : launch_shape<__half>(p, wg, tm, stages, splits, s);
  return static_cast<int>(e);
}
