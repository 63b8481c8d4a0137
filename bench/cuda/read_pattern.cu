// How fast can blocks stream a row-major [N, K/2] byte matrix when each block walks BN
// rows along K, fetching S contiguous bytes of each row per step through a cp.async ring
// (the W4A16 kernels' access pattern at S = 32)? No compute: the memory system alone.
// usage: read_pattern  (prints one line per (S, BN, stages, blocks/SM) with GB/s)
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

template <int S, int BN, int NSTAGE>
__global__ void __launch_bounds__(256) read_kernel(const uint8_t* w, long row_bytes, int steps, int* sink) {
  extern __shared__ __align__(16) uint8_t ring[];
  const int pieces = BN * S / 16;  // 16-byte cp.async pieces a step
  const uint8_t* base = w + static_cast<long>(blockIdx.x) * BN * row_bytes + static_cast<long>(blockIdx.y) * steps * S;
  auto load = [&](int step, int st) {
    for (int p = threadIdx.x; p < pieces; p += blockDim.x) {
      const int row = p / (S / 16), off = (p % (S / 16)) * 16;
      uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(ring + (st * BN * S) + p * 16));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(base + row * row_bytes + step * S + off));
    }
    asm volatile("cp.async.commit_group;");
  };
  for (int i = 0; i < NSTAGE - 1; ++i) load(i, i);
  int acc = 0;
  for (int i = 0; i < steps; ++i) {
    asm volatile("cp.async.wait_group %0;" ::"n"(NSTAGE - 2));
    __syncthreads();
    if (i + NSTAGE - 1 < steps) load(i + NSTAGE - 1, (i + NSTAGE - 1) % NSTAGE);
    else asm volatile("cp.async.commit_group;");
    acc += ring[(i % NSTAGE) * BN * S + threadIdx.x * 4];
  }
  if (acc == 12345) *sink = acc;
}

template <int S, int BN, int NSTAGE> void run(const uint8_t* w, long n, long row_bytes, int splits, int* sink) {
  const int smem = NSTAGE * BN * S;
  auto k = read_kernel<S, BN, NSTAGE>;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const int steps = static_cast<int>(row_bytes / S / splits);
  dim3 grid(n / BN, splits);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int r = 0; r < 3; ++r) k<<<grid, 256, smem>>>(w, row_bytes, steps, sink);
  cudaEventRecord(a);
  const int reps = 20;
  for (int r = 0; r < reps; ++r) k<<<grid, 256, smem>>>(w, row_bytes, steps, sink);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms;
  cudaEventElapsedTime(&ms, a, b);
  ms /= reps;
  int occ = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, k, 256, smem);
  printf("S %4d BN %3d stages %d splits %2d blocks %5d (%d/SM): %.3f ms %7.1f GB/s\n", S, BN, NSTAGE, splits,
         grid.x * grid.y, occ, ms, n * row_bytes / ms / 1e6);
}

int main() {
  const long n = 28672, row_bytes = 7168 / 2;  // OPT-30B fc1, packed
  uint8_t* w;
  int* sink;
  cudaMalloc(&w, n * row_bytes);
  cudaMalloc(&sink, 4);
  cudaMemset(w, 1, n * row_bytes);
  run<32, 256, 4>(w, n, row_bytes, 1, sink);
  run<32, 256, 8>(w, n, row_bytes, 1, sink);
  run<32, 128, 4>(w, n, row_bytes, 2, sink);
  run<64, 256, 4>(w, n, row_bytes, 1, sink);
  run<128, 256, 4>(w, n, row_bytes, 1, sink);
  run<128, 128, 4>(w, n, row_bytes, 1, sink);
  run<128, 128, 4>(w, n, row_bytes, 2, sink);
  run<256, 128, 4>(w, n, row_bytes, 1, sink);
  run<256, 64, 4>(w, n, row_bytes, 2, sink);
  run<512, 64, 3>(w, n, row_bytes, 1, sink);
  run<3584, 16, 2>(w, n, row_bytes, 1, sink);
  cudaError_t e = cudaDeviceSynchronize();
  printf("%s\n", cudaGetErrorString(e));
  return 0;
}
