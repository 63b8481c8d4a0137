// W4A16 linear at decode sizes, register-fed: Y[M, N] = X[M, K] @ W^T (+ bias), M <= 64.
//
// Why not Triton: the Triton kernel (w4a16.py) is bound by shared memory, not DRAM
// (ncu: shared-memory throughput ~76%, DRAM ~23%): the dequantized weights are written to and
// read back from shared memory to reach the tensor cores. Here they never are: each
// thread dequantizes exactly the weights of its own mma.sync B fragments in registers.
//
// Layout (strata.model.quant's format, read as stored; nothing is reshuffled):
//   W  [N, K/2] uint8, even k in the high nibble; scale, min [N, K/64] fp16, w = q*s + m.
//   X  [M, K] bf16 or fp16, row stride ldx.
// The trick that lets a thread read its weights with one 8-byte load: the order of k
// inside an mma is free as long as A and B agree. A thread (group g = lane/4, t = lane%4)
// takes the 16 k of a 64-wide quantization group at 16t..16t+15, which are 8 contiguous
// bytes of its weight row. Of each 4 bytes (8 k) it makes two mma steps; in step u its
// B registers hold (k0, k1) and (k2, k3) of bytes 2u, 2u+1 (prmt + lop3 put a nibble under
// the exponent of 128 / 1024, two FMAs give q*s+m rounded once), and its A registers hold
// the same columns of X: rows g and g+8, (x0, x1) and (x2, x3), one 16-byte shared-
// memory read, because X's tile is stored in that fragment order (see XStage).
//
// Block: WARPS warps, each 32 output columns (four n8 tiles) by all 64 rows (four m16
// tiles), 64 fp32 accumulators a thread. K is walked one group (64) at a time, one
// barrier a group. The block's packed weights (BN x 32 B a group) come through an NSTAGE
// cp.async ring; scale and min arrive 8 groups at a time. X's tile (64 x 64, from L2)
// is loaded into registers one group ahead and stored in fragment order into one of two
// shared buffers after the group's mma. Split-K: grid.y splits K in chunks of 8 groups;
// each writes fp32 partials [split, M, N] that a second kernel sums (plus bias, cast):
// deterministic, no atomics.
//
// Its limit (ncu): at 64 rows mma.sync's issue rate binds (64 HMMA among ~410
// instructions a group a warp; the tensor pipe ~41% busy, DRAM ~29%). w4a16_wgmma.cu
// goes past it on Hopper, with these dequantized weights as wgmma's register A operand.
#include "w4a16_common.cuh"

namespace {

constexpr int ROWS = 64;    // rows of X per block: four m16 tiles
constexpr int X_TILE = ROWS * GROUP * 2;  // bytes of X a group

template <typename T> __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                          uint32_t b1);
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                               uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Resident blocks an SM is built for (registers: 65536 / (threads * blocks)); shared
// memory allows it (Tile::SMEM).
constexpr int blocks_per_sm(int warps, int stages) { return warps >= 8 ? 2 : stages >= 4 ? 3 : 4; }

// X's tile for one group in registers, on its way to shared memory in fragment order:
// item ((mt * 2 + wd) * 2 + u) * 32 + lane is the 16 bytes that lane (g, t) reads as its A
// registers for m16 tile mt, word wd, step u: (row g, x0 x1), (row g+8, x0 x1), (row g,
// x2 x3), (row g+8, x2 x3) of columns 16t + 8wd + 4u of rows mt*16 + g (+8). A thread
// carries rows r and r+8 of one 16-byte column piece c, so each store is a register pick.
template <int THREADS> struct XStage {
  static constexpr int UNITS = ROWS / 2 * 8 / THREADS;  // (row pair, piece) units a thread
  uint4 lo[UNITS], hi[UNITS];

  __device__ void load(const Problem& p, int gk) {
#pragma unroll
    for (int it = 0; it < UNITS; ++it) {
      const int unit = threadIdx.x + it * THREADS, mt = unit >> 6, g = (unit >> 3) & 7, c = unit & 7;
      const int r = mt * 16 + g;
      const long col = static_cast<long>(gk) * GROUP + c * 8;
      const uint16_t* x = static_cast<const uint16_t*>(p.x);
      lo[it] = r < p.m ? *reinterpret_cast<const uint4*>(x + r * p.ldx + col) : make_uint4(0, 0, 0, 0);
      hi[it] = r + 8 < p.m ? *reinterpret_cast<const uint4*>(x + (r + 8) * p.ldx + col) : make_uint4(0, 0, 0, 0);
    }
  }

  __device__ void store(unsigned char* xs) const {
#pragma unroll
    for (int it = 0; it < UNITS; ++it) {
      const int unit = threadIdx.x + it * THREADS, mt = unit >> 6, g = (unit >> 3) & 7, c = unit & 7;
      const int t = c >> 1, wd = c & 1;
      uint4* item = reinterpret_cast<uint4*>(xs) + ((mt * 2 + wd) * 2) * 32 + g * 4 + t;
      item[0] = make_uint4(lo[it].x, hi[it].x, lo[it].y, hi[it].y);   // u = 0
      item[32] = make_uint4(lo[it].z, hi[it].z, lo[it].w, hi[it].w);  // u = 1
    }
  }
};

template <int WARPS, int NSTAGE> struct Tile : WeightRing<WARPS * 32, WARPS * 32, NSTAGE> {
  static constexpr int THREADS = WARPS * 32;
  static constexpr int BN = WARPS * 32;
  static constexpr int X_BYTES = 2 * X_TILE;
  static constexpr int SMEM = X_BYTES + WeightRing<BN, THREADS, NSTAGE>::BYTES;

  unsigned char* xs;

  __device__ Tile(unsigned char* smem, const Problem& p, int n0, int g0)
      : WeightRing<BN, THREADS, NSTAGE>(smem + X_BYTES, p, n0, g0), xs(smem) {}
};

template <typename T, int WARPS, int NSTAGE>
__device__ __forceinline__ void compute_group(const Tile<WARPS, NSTAGE>& tile, int xb, int st, int sb, int gl,
                                              float (&acc)[4][4][4]) {
  constexpr int BN = Tile<WARPS, NSTAGE>::BN;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  uint2 wq[4];
  uint32_t s2[4], m2[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // n8 tile j: the thread's weight row
    const int r = warp * 32 + j * 8 + g;
    wq[j] = *reinterpret_cast<const uint2*>(tile.ws + (st * BN + r) * 32 + 8 * t);
    s2[j] = splat<T>(__half2float(tile.ss[(sb * BN + r) * CHUNK + gl]));
    m2[j] = splat<T>(__half2float(tile.ms[(sb * BN + r) * CHUNK + gl]));
  }
  const uint4* xst = reinterpret_cast<const uint4*>(tile.xs + xb * X_TILE) + lane;
#pragma unroll
  for (int wd = 0; wd < 2; ++wd) {  // k 16t + 8wd .. +7
    uint32_t b[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) dequant_word<T>(wd ? wq[j].y : wq[j].x, s2[j], m2[j], b[j]);
#pragma unroll
    for (int u = 0; u < 2; ++u) {  // x[4u..4u+3] of rows g, g+8: (x0, x1) and (x2, x3), as the B registers
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {  // (an accumulator's next mma is 16 mma later)
        const uint4 v = xst[((mt * 2 + wd) * 2 + u) * 32];
        const uint32_t a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) mma<T>(acc[mt][j], a, b[j][2 * u], b[j][2 * u + 1]);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void store(const Problem& p, int n0, const float (&acc)[4][4][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const bool partial = gridDim.y > 1;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int col = n0 + warp * 32 + j * 8 + 2 * t;
    float b0 = 0.f, b1 = 0.f;
    if (!partial && p.bias != nullptr) {
      const T* bias = static_cast<const T*>(p.bias);
      b0 = static_cast<float>(bias[col]);
      b1 = static_cast<float>(bias[col + 1]);
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = mt * 16 + g + 8 * h;
        if (row >= p.m) continue;
        const float v0 = acc[mt][j][2 * h], v1 = acc[mt][j][2 * h + 1];
        if (partial) {
          float* dst = p.part + (static_cast<long>(blockIdx.y) * p.m + row) * p.n + col;
          *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
        } else {
          T* dst = static_cast<T*>(p.y) + static_cast<long>(row) * p.n + col;
          *reinterpret_cast<uint32_t*>(dst) = pack2(from_float<T>(v0 + b0), from_float<T>(v1 + b1));
        }
      }
    }
  }
}

template <typename T, int WARPS, int NSTAGE>
__global__ void __launch_bounds__(WARPS * 32, blocks_per_sm(WARPS, NSTAGE)) w4a16_m64_kernel(const __grid_constant__ Problem p) {
  extern __shared__ __align__(16) unsigned char smem[];
  using TileT = Tile<WARPS, NSTAGE>;
  const int n0 = blockIdx.x * TileT::BN;
  const int chunks = p.k / (GROUP * CHUNK);
  const int c0 = blockIdx.y * p.chunks_per_split;
  const int groups = (min(c0 + p.chunks_per_split, chunks) - c0) * CHUNK;
  const int g0 = c0 * CHUNK;
  TileT tile(smem, p, n0, g0);
  float acc[4][4][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

  // cp.async commit i holds group i's weights; chunk c+1's scales ride with the commit
  // made at group 8c, complete before group 8(c+1) runs. One barrier a group: after it,
  // every warp is done with group i-1, so its weight stage and X buffer can be refilled.
  XStage<TileT::THREADS> xnext;
  tile.load_scales(p, 0, 0);
#pragma unroll
  for (int i = 0; i < NSTAGE - 1; ++i) {
    if (i < groups) tile.load_weights(p, i, i);
    cp_async_commit();
  }
  xnext.load(p, g0);
  xnext.store(tile.xs);
  int st = 0, fill = NSTAGE - 1;  // weight stages: computed (i % NSTAGE), refilled ((i - 1) % NSTAGE)
  for (int i = 0; i < groups; ++i) {
    cp_async_wait<NSTAGE - 2>();
    __syncthreads();
    if (i + NSTAGE - 1 < groups) tile.load_weights(p, i + NSTAGE - 1, fill);
    if (i % CHUNK == 0 && i + CHUNK < groups) tile.load_scales(p, i / CHUNK + 1, (i / CHUNK + 1) & 1);
    cp_async_commit();
    const bool more = i + 1 < groups;
    if (more) xnext.load(p, g0 + i + 1);
    compute_group<T, WARPS, NSTAGE>(tile, i & 1, st, (i / CHUNK) & 1, i % CHUNK, acc);
    if (more) xnext.store(tile.xs + ((i + 1) & 1) * X_TILE);
    fill = st;
    st = st + 1 == NSTAGE ? 0 : st + 1;
  }
  store<T>(p, n0, acc);
}

template <typename T, int WARPS, int NSTAGE> cudaError_t launch(const Problem& p, int splits, cudaStream_t stream) {
  using TileT = Tile<WARPS, NSTAGE>;
  auto kernel = w4a16_m64_kernel<T, WARPS, NSTAGE>;
  static bool configured = false;  // the opt-in above 48 KB of shared memory, once per kernel
  if (!configured) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TileT::SMEM);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  dim3 grid(p.n / TileT::BN, splits);
  kernel<<<grid, WARPS * 32, TileT::SMEM, stream>>>(p);
  if (splits > 1) launch_splitk_sum<T>(p, splits, stream);
  return cudaGetLastError();
}

template <typename T> cudaError_t launch_shape(const Problem& p, int warps, int stages, int splits,
                                               cudaStream_t stream) {
  if (warps == 4 && stages == 3) return launch<T, 4, 3>(p, splits, stream);
  if (warps == 4 && stages == 4) return launch<T, 4, 4>(p, splits, stream);
  if (warps == 8 && stages == 3) return launch<T, 8, 3>(p, splits, stream);
  if (warps == 8 && stages == 4) return launch<T, 8, 4>(p, splits, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

// dtype: 0 bfloat16, 1 float16; (warps, stages): (4, 3), (4, 4), (8, 3) or (8, 4). Preconditions (checked by the caller, w4a16_mma.py): 0 < m <= 64;
// n a multiple of 32 * warps; k a multiple of 512; all pointers 16-byte aligned, w, scale,
// min and y contiguous, x's rows ldx elements apart (ldx a multiple of 8); `part` holds
// splits * m * n floats when splits > 1; splits = ceil(k / 512 / chunks_per_split).
// Returns a cudaError_t (0: launched).
extern "C" int strata_w4a16_m64(int dtype, int warps, int stages, const void* x, long ldx, const void* w, const void* scale,
                                const void* wmin, const void* bias, void* y, void* part, int m, int n, int k,
                                int chunks_per_split, int splits, void* stream) {
  Problem p{x,  ldx, static_cast<const uint8_t*>(w), static_cast<const __half*>(scale),
            static_cast<const __half*>(wmin), bias, y, static_cast<float*>(part), m, n, k, chunks_per_split};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e = dtype == 0 ? launch_shape<__nv_bfloat16>(p, warps, stages, splits, s)
                             : launch_shape<__half>(p, warps, stages, splits, s);
  return static_cast<int>(e);
}
