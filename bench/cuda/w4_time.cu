// Times the wgmma W4A16 kernel on OPT-30B's four decode shapes at 64 rows from C++ (no
// Python between launches). Runs 62-64 built it with parts of the kernel's work compiled
// out (X staging, dequantization, wgmma) to see which part set its speed.
// usage: nvcc -O3 -std=c++17 -arch=sm_90a -o a w4_time.cu && ./a WG TM STAGES [SPLITS x4]
#include "../../compute_node/kernels/w4a16_wgmma.cu"
#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  const int wg = argc > 1 ? atoi(argv[1]) : 1, tm = argc > 2 ? atoi(argv[2]) : 2, st = argc > 3 ? atoi(argv[3]) : 6;
  int shapes[4][3] = {{7168, 7168, 4}, {21504, 7168, 3}, {28672, 7168, 1}, {7168, 28672, 4}};  // N, K, splits
  for (int i = 0; i < 4 && argc > 4 + i; ++i) shapes[i][2] = atoi(argv[4 + i]);
  const int m = 64;
  for (auto& sh : shapes) {
    const int n = sh[0], k = sh[1], splits = sh[2];
    void *x, *w, *s, *mn, *y, *part;
    cudaMalloc(&x, 2L * m * k);
    cudaMalloc(&w, 1L * n * k / 2);
    cudaMalloc(&s, 2L * n * k / 64);
    cudaMalloc(&mn, 2L * n * k / 64);
    cudaMalloc(&y, 2L * m * n);
    cudaMalloc(&part, 4L * splits * m * n);
    cudaMemset(x, 0, 2L * m * k);
    cudaMemset(w, 0x11, 1L * n * k / 2);
    cudaMemset(s, 0, 2L * n * k / 64);
    cudaMemset(mn, 0, 2L * n * k / 64);
    const int chunks = k / 512, per = (chunks + splits - 1) / splits;
    auto go = [&]() {
      return strata_w4a16_wgmma(0, wg, tm, st, x, k, w, s, mn, nullptr, y, part, m, n, k, per,
                                (chunks + per - 1) / per, nullptr);
    };
    for (int r = 0; r < 3; ++r) go();
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    const int reps = 50;
    cudaEventRecord(a);
    for (int r = 0; r < reps; ++r) go();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    ms /= reps;
    printf("%5dx%-5d split %2d: %.4f ms %6.0f GB/s packed (%s)\n", n, k, splits, ms, n * (k / 2.0 + k / 16.0) / ms / 1e6,
           cudaGetErrorString(cudaGetLastError()));
    cudaFree(x); cudaFree(w); cudaFree(s); cudaFree(mn); cudaFree(y); cudaFree(part);
  }
  return 0;
}
