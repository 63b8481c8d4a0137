// W4A16 linear at decode sizes on Hopper's wgmma: Y[M, N] = X[M, K] @ W^T (+ bias), M <= 128.
//
// Why (ncu): w4a16_mma.cu is bound by mma.sync's issue rate at 64 rows: 64 HMMA among
// ~410 instructions a group a warp, most of the rest loading X's fragments. Here the
// product is transposed, Y^T = W X^T, so that the weights are wgmma's A operand,
// dequantized in registers (as in w4a16_mma.cu), and X^T is its B operand, read by the
// tensor cores from shared memory with no instruction per fragment.
// wgmma is asynchronous: a warpgroup dequantizes group i+1 while group i multiplies.
//
// Layout (strata.model.quant's format, read as stored): W [N, K/2] uint8, even k in the high
// nibble; scale, min [N, K/64] fp16, w = q*s + m. X [M, K] bf16 or fp16, row stride ldx.
// X's tile for a group (64 rows x 64 k, 128 bytes a row) comes by TMA (one bulk tensor
// copy, rows past M zero-filled) into wgmma's K-major 128-byte-swizzled layout. A thread
// (g = lane/4, t = lane%4) of warp w of a warpgroup holds, for its m64 tile, weight rows
// 16w+g and 16w+g+8; its A registers for k16 step s are k 16s+2t, +1 and 16s+2t+8, +9,
// which are bytes 8s+t and 8s+t+4 of the row's 32-byte group: every fourth byte, from t.
// It reads the row's 32 bytes and gathers its 8 with prmt, so the k order is wgmma's own
// and nothing is reshuffled in memory.
//
// Why TMA for X: every block reads X's tile from L2 each group; staged through registers
// it cost ~40% of the time, and as many 16-byte cp.async copies it was slower still. One
// bulk copy a group takes it off the threads: on OPT-30B's four shapes at 64 rows the
// kernel reads 1.0-1.5 TB/s of packed weights, about 1.4-1.6x the mma.sync kernel's rate
// (bench/cuda/w4_time.cu; BENCHMARKS.md, eighth session).
//
// Block: WG warpgroups, each TM m64 tiles of output columns (BN = 64 * TM * WG), by all TOK
// rows of X (wgmma's n: 64, or 128 for 65-128 rows, so that each weight is dequantized
// once for all of them instead of once a 64-row call; rows past M are zero-filled). K is walked one group at a
// time, one barrier a group. A group's weights (WeightRing, cp.async) and X tile (TMA, an
// mbarrier a stage) share an NSTAGE ring, filled NSTAGE - 2 groups ahead: a stage is
// refilled two groups after its wgmma was issued, when every warpgroup has waited for it.
// Split-K as in w4a16_mma.cu.
#include <cudaTypedefs.h>

#include <type_traits>

#include "w4a16_common.cuh"

namespace {

// X's group for TOK rows (wgmma's n, zero-padded): 8 or 16 KB, 128-byte rows swizzled in 1 KB atoms
template <int TOK> constexpr int x_tile = TOK * GROUP * 2;

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// The mbarrier a stage's X copy completes on: armed for X_TILE bytes by one thread.
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)));
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
// X's group gk (columns 64gk.., all TOK rows) into xs, completing on bar.
template <int TOK>
__device__ __forceinline__ void load_x(const CUtensorMap* map, int gk, unsigned char* xs, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "n"(x_tile<TOK>)
               : "memory");
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
      ::"r"(smem_addr(xs)), "l"(reinterpret_cast<uint64_t>(map)), "r"(gk * GROUP), "r"(0), "r"(smem_addr(bar))
      : "memory");
}
// Keeps the compiler from moving accumulator registers across wgmma's asynchronous use.
template <int N> __device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
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

// Shared-memory matrix descriptor for a k16 step of X: the start address (the tile plus
// 32 bytes a step, inside the swizzled 128-byte rows), SBO 1 KB (row octets), 128-byte
// swizzle (LBO unused).
__device__ __forceinline__ uint64_t x_desc(const unsigned char* p) {
  return static_cast<uint64_t>((smem_addr(p) & 0x3FFFF) >> 4) | (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (1ull << 62);
}

// D[64 x 64] += A[64 x 16] (registers) * B[16 x 64] (shared memory, K-major), fp32 D.
#define STRATA_WGMMA_M64N64K16(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
      "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
        "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
        "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))

// D[64 x 128] += A[64 x 16] (registers) * B[16 x 128] (shared memory, K-major), fp32 D.
#define STRATA_WGMMA_M64N128K16(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "\
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "\
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "\
      "%56, %57, %58, %59, %60, %61, %62, %63}, " \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
        "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
        "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
        "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), \
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))

// d += A * X^T over TOK rows of X (TOK / 2 accumulators a thread).
template <typename T, int TOK> __device__ __forceinline__ void wgmma(float (&d)[TOK / 2], const uint32_t (&a)[4],
                                                                     uint64_t desc) {
  constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  if constexpr (TOK == 64) {
    if constexpr (bf16) STRATA_WGMMA_M64N64K16("bf16"); else STRATA_WGMMA_M64N64K16("f16");
  } else {
    static_assert(TOK == 128, "wgmma's n: 64 or 128 rows of X");
    if constexpr (bf16) STRATA_WGMMA_M64N128K16("bf16"); else STRATA_WGMMA_M64N128K16("f16");
  }
}
#undef STRATA_WGMMA_M64N64K16
#undef STRATA_WGMMA_M64N128K16

template <int TOK, int WG, int TM, int NSTAGE> struct Tile {
  static constexpr int THREADS = WG * 128;
  static constexpr int BN = WG * TM * 64;
  using Ring = WeightRing<BN, THREADS, NSTAGE>;
  static constexpr int X_TILE = x_tile<TOK>;
  static constexpr int X_BYTES = NSTAGE * X_TILE;
  static constexpr int SMEM = 1024 + X_BYTES + Ring::BYTES + NSTAGE * 8;  // (1 KB: the X tiles' alignment)
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

template <typename T, int TOK, int TM>
__device__ __forceinline__ void issue_group(const unsigned char* xs, const uint32_t (&a)[TM][4][4],
                                            float (&acc)[TM][TOK / 2]) {
  uint64_t desc[4];  // made before the fence: no other instruction may define a wgmma input between it and the commit
#pragma unroll
  for (int s = 0; s < 4; ++s) desc[s] = x_desc(xs + s * 32);
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int tm = 0; tm < TM; ++tm) wgmma<T, TOK>(acc[tm], a[tm][s], desc[s]);
  wgmma_commit();
}

// Accumulator d[4j + 2h + e] of tile tm is output column (weight row) 16w + g + 8h of the
// tile, X row 8j + 2t + e.
template <typename T, int TOK, int TM>
__device__ __forceinline__ void store(const Problem& p, int n0, const float (&acc)[TM][TOK / 2]) {
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
      for (int j = 0; j < TOK / 8; ++j) {
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

template <typename T, int TOK, int WG, int TM, int NSTAGE>
__global__ void __launch_bounds__(WG * 128, 1) w4a16_wgmma_kernel(const __grid_constant__ Problem p,
                                                                  const __grid_constant__ CUtensorMap xmap) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  using TileT = Tile<TOK, WG, TM, NSTAGE>;
  constexpr int X_TILE = TileT::X_TILE;
  const int n0 = blockIdx.x * TileT::BN;
  const int chunks = p.k / (GROUP * CHUNK);
  const int c0 = blockIdx.y * p.chunks_per_split;
  const int groups = (min(c0 + p.chunks_per_split, chunks) - c0) * CHUNK;
  const int g0 = c0 * CHUNK;
  typename TileT::Ring ring(smem + TileT::X_BYTES, p, n0, g0);
  uint64_t* xbar = reinterpret_cast<uint64_t*>(smem + TileT::X_BYTES + TileT::Ring::BYTES);
  const bool producer = threadIdx.x == 0;  // issues the X copies
  if (producer) {
    for (int j = 0; j < NSTAGE; ++j) mbar_init(xbar + j);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  float acc[TM][TOK / 2];
#pragma unroll
  for (int tm = 0; tm < TM; ++tm)
#pragma unroll
    for (int e = 0; e < TOK / 2; ++e) acc[tm][e] = 0.f;

  // cp.async commit j holds group j's weights (its X comes by TMA, completing on xbar[j %
  // NSTAGE]); chunk c+1's scales ride with the commit made at group 8c. Group i's stage
  // i % NSTAGE is refilled at step i + 2.
  ring.load_scales(p, 0, 0);
#pragma unroll
  for (int j = 0; j < NSTAGE - 2; ++j) {
    if (j < groups) {
      ring.load_weights(p, j, j);
      if (producer) load_x<TOK>(&xmap, g0 + j, smem + j * X_TILE, xbar + j);
    }
    cp_async_commit();
  }

  uint32_t a[2][TM][4][4];  // group i's A registers: a[i & 1] (wgmma reads them until group i + 1 is waited on)
  int st = 0, fill = NSTAGE - 2;  // stages: computed (i % NSTAGE), refilled ((i - 2) % NSTAGE)
  auto step = [&](int i, uint32_t(&ai)[TM][4][4], const uint32_t(&prev)[TM][4][4]) {
    cp_async_wait<NSTAGE - 3>();
    mbar_wait(xbar + st, (i / NSTAGE) & 1);  // the stage's (i / NSTAGE)-th fill
    __syncthreads();
    if (i + NSTAGE - 2 < groups) {
      ring.load_weights(p, i + NSTAGE - 2, fill);
      if (producer) load_x<TOK>(&xmap, g0 + i + NSTAGE - 2, smem + fill * X_TILE, xbar + fill);
    }
    if (i % CHUNK == 0 && i + CHUNK < groups) ring.load_scales(p, i / CHUNK + 1, (i / CHUNK + 1) & 1);
    cp_async_commit();
    dequant_group<T, TileT::BN, TM>(ring, st, (i / CHUNK) & 1, i % CHUNK, ai);
    issue_group<T, TOK, TM>(smem + st * X_TILE, ai, acc);
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
  store<T, TOK, TM>(p, n0, acc);
}

// X as a 2D tensor (K columns, M rows, ldx apart) for TMA, boxes of 64 columns x TOK rows,
// 128-byte swizzle, rows past M read as zeros. cuTensorMapEncodeTiled comes from the driver
// through the runtime (no link to libcuda).
template <typename T, int TOK> cudaError_t x_tensor_map(const Problem& p, CUtensorMap* map) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult found;
    cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode),
                                                     12000, cudaEnableDefault, &found);
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      encode = nullptr;
      return e != cudaSuccess ? e : cudaErrorNotSupported;
    }
  }
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.k), static_cast<cuuint64_t>(p.m)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.ldx) * 2};
  const cuuint32_t box[2] = {GROUP, TOK}, unit[2] = {1, 1};
  const CUtensorMapDataType type =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  CUresult r = encode(map, type, 2, const_cast<void*>(p.x), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, int TOK, int WG, int TM, int NSTAGE>
cudaError_t launch(const Problem& p, int splits, cudaStream_t stream) {
  using TileT = Tile<TOK, WG, TM, NSTAGE>;
  CUtensorMap xmap;
  cudaError_t me = x_tensor_map<T, TOK>(p, &xmap);
  if (me != cudaSuccess) return me;
  auto kernel = w4a16_wgmma_kernel<T, TOK, WG, TM, NSTAGE>;
  static bool configured = false;  // the opt-in above 48 KB of shared memory, once per kernel
  if (!configured) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TileT::SMEM);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  dim3 grid(p.n / TileT::BN, splits);
  kernel<<<grid, TileT::THREADS, TileT::SMEM, stream>>>(p, xmap);
  if (splits > 1) launch_splitk_sum<T>(p, splits, stream);
  return cudaGetLastError();
}

template <typename T> cudaError_t launch_shape(const Problem& p, int tokens, int wg, int tm, int stages, int splits,
                                               cudaStream_t stream) {
  if (tokens == 64) {
    if (wg == 1 && tm == 2 && stages == 6) return launch<T, 64, 1, 2, 6>(p, splits, stream);
    if (wg == 2 && tm == 1 && stages == 6) return launch<T, 64, 2, 1, 6>(p, splits, stream);
    if (wg == 2 && tm == 1 && stages == 8) return launch<T, 64, 2, 1, 8>(p, splits, stream);
    if (wg == 2 && tm == 2 && stages == 6) return launch<T, 64, 2, 2, 6>(p, splits, stream);
  } else if (tokens == 128) {
    if (wg == 2 && tm == 1 && stages == 4) return launch<T, 128, 2, 1, 4>(p, splits, stream);
    if (wg == 2 && tm == 1 && stages == 6) return launch<T, 128, 2, 1, 6>(p, splits, stream);
    if (wg == 4 && tm == 1 && stages == 4) return launch<T, 128, 4, 1, 4>(p, splits, stream);
    if (wg == 1 && tm == 2 && stages == 4) return launch<T, 128, 1, 2, 4>(p, splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// dtype: 0 bfloat16, 1 float16; tokens (wgmma's n, rows of X a block takes): 64 with
// (wg, tm, stages) (1, 2, 6), (2, 1, 6), (2, 1, 8) or (2, 2, 6); 128 with (2, 1, 4),
// (2, 1, 6), (4, 1, 4) or (1, 2, 4) (w4a16_wgmma.py SHAPES). Preconditions (checked by the
// caller, w4a16_wgmma.py): 0 < m <= tokens; n a multiple of 64 * tm * wg; k a multiple of 512; all pointers 16-byte aligned, w, scale,
// min and y contiguous, x's rows ldx elements apart (ldx a multiple of 8); `part` holds
// splits * m * n floats when splits > 1; splits = ceil(k / 512 / chunks_per_split).
// Returns a cudaError_t (0: launched).
extern "C" int strata_w4a16_wgmma(int dtype, int tokens, int wg, int tm, int stages, const void* x, long ldx, const void* w,
                                  const void* scale, const void* wmin, const void* bias, void* y, void* part, int m,
                                  int n, int k, int chunks_per_split, int splits, void* stream) {
  Problem p{x,  ldx, static_cast<const uint8_t*>(w), static_cast<const __half*>(scale),
            static_cast<const __half*>(wmin), bias, y, static_cast<float*>(part), m, n, k, chunks_per_split};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e = dtype == 0 ? launch_shape<__nv_bfloat16>(p, tokens, wg, tm, stages, splits, s)
                             : launch_shape<__half>(p, tokens, wg, tm, stages, splits, s);
  return static_cast<int>(e);
}
