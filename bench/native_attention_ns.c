/* Per-vector cost of the KV store kernels (kv_store/decode_attention.c) on one thread, on
 * a row small enough for L2: compute, not DRAM. Dev-machine figures in the commit log.
 *   cc -O3 -march=native -fopenmp-simd -fno-math-errno -fno-trapping-math -fassociative-math \
 *      -fno-signed-zeros -o /tmp/ns bench/native_attention_ns.c kv_store/decode_attention.c -lm && /tmp/ns
 * (add -DSTRATA_NO_BF16DOT for the plain paths where the CPU has AVX512_BF16) */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
void strata_decode_attention_quant(const uint16_t*, const uint8_t*, const uint16_t*, const uint16_t*, const uint8_t*, const uint16_t*, const uint16_t*, const float*, uint16_t*,
 int64_t H, int64_t Hkv, int64_t T, int64_t D, int64_t group, int64_t bits, int64_t sq_b, int64_t sq_h, int64_t sc_b, int64_t sc_h, int64_t sc_t, int64_t ss_b, int64_t ss_h, int64_t ss_t, int64_t sm_b, int64_t sm_h, int64_t so_b, int64_t so_h, float scale, int64_t *next, int64_t rows, int64_t chunk, float *scratch);
typedef struct { const uint16_t *k_new, *v_new; const int64_t *cols; int64_t sn_b, sn_h; } bf16_new; /* as decode_attention.c's */
void strata_decode_attention_bf16(const uint16_t*, uint16_t*, uint16_t*, const float*, uint16_t*, int64_t H, int64_t Hkv, int64_t T, int64_t D,
 int64_t sq_b, int64_t sq_h, int64_t sk_b, int64_t sk_h, int64_t sk_t, int64_t sv_b, int64_t sv_h, int64_t sv_t, int64_t sm_b, int64_t sm_h, int64_t so_b, int64_t so_h, float scale, bf16_new nw, int64_t *next, int64_t rows, int64_t chunk, float *scratch);
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  int64_t H=8,T=528,D=128;
  uint8_t *c = malloc(H*T*D); uint16_t *s = malloc(H*T*2*2); uint16_t *q=malloc(H*D*2), *o=malloc(H*D*2); float *scr=malloc(1<<24);
  uint16_t *kb = malloc(H*T*D*2);
  for (int i=0;i<H*T*D;i++){c[i]=rand(); kb[i]=0x3f80;} for(int i=0;i<H*T*2;i++) s[i]=0x3c00; for(int i=0;i<H*D;i++) q[i]=0x3f80;
  for (int bits=8; bits>=4; bits-=4){
    int64_t cw = bits==8?D:D/2;
    double t0=now(); int n=2000;
    for(int i=0;i<n;i++) { int64_t nx=0; strata_decode_attention_quant(q,c,s,s,c,s,s,0,o,H,H,T,D,64,bits,H*D,D,H*T*cw,T*cw,cw,H*T*2,T*2,2,0,0,H*D,D,0.1f,&nx,H,H,scr); }
    double dt=(now()-t0)/n; printf("bits %d: %.2f ns per token-vector\n", bits, dt*1e9/(2*H*T));
  }
  double t0=now(); int n=2000;
  for(int i=0;i<n;i++) { int64_t nx=0; strata_decode_attention_bf16(q,kb,kb,0,o,H,H,T,D,H*D,D,H*T*D,T*D,D,H*T*D,T*D,D,0,0,H*D,D,0.1f,(bf16_new){0},&nx,H,H,scr); }
  double dt=(now()-t0)/n; printf("bf16: %.2f ns per token-vector\n", dt*1e9/(2*H*T));
}
