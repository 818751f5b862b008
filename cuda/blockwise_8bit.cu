/*
 * blockwise_8bit.cu -- 8-bit blockwise quantization with a 256-entry dynamic map, and its
 * inverse (bnb kQuantizeBlockwise<General8bit> / kDequantizeBlockwise, section 4.3).
 *
 * Launch contract, quantize:
 *   kernels  quantize_8bit_f32 / _f16 / _bf16
 *            (const T* x, const float* code, unsigned char* out, float* absmax,
 *             QloraBlockwise8Args a)
 *   block    QLORA_QUANT_THREADS (256) threads; 1 KiB static shared memory (the map)
 *   grid     ceil(a.n / (256 * E)), E = max(2, blocksize / 256) elements per thread
 *   owns     as quantize_4bit.cu: thread t of block b owns E consecutive elements from
 *            (b * 256 + t) * E; blocksize / E consecutive threads form one quantization block
 *   writes   absmax[ceil(n / bs)] (max ftz(|x|), padding zeros included) and out[n]:
 *            the nearest entry of code to ftz(ftz(x) * rcp.approx.ftz(absmax)) -- bitsandbytes'
 *            fast-math reciprocal (MUFU.RCP) and flush-to-zero --, ties to the even index,
 *            NaN (also from an all-zero block) to index 0
 *   requires blocksize a power of two in [64, 4096]; code sorted ascending (256 entries)
 *
 * Launch contract, dequantize:
 *   kernels  dequantize_8bit_f32 / _f16 / _bf16
 *            (const unsigned char* q, const float* code, const float* absmax, T* out,
 *             QloraBlockwise8Args a)
 *   block    QLORA_DEQUANT_THREADS (256) threads, 1 KiB static shared memory (the map);
 *            grid ceil(n / 256); thread i writes out[i] =
 *            T(f32(code[q[i]] * absmax[i / bs])) (one f32 multiply, RNE conversion)
 */
#include "qlora_kernels.h"
#include "common.cuh"

template <typename T>
__device__ void quantize_8bit(const T* __restrict__ x, const float* __restrict__ code,
                              unsigned char* __restrict__ out, float* __restrict__ absmax,
                              QloraBlockwise8Args a) {
    __shared__ float smem_code[QLORA_DYNAMIC_MAP_LEN];
    __shared__ float scratch[QLORA_QUANT_THREADS / 32];
    smem_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();

    const unsigned int bs = a.blocksize;
    const unsigned int e = quant_items_per_thread(bs);
    const u64 first = ((u64)blockIdx.x * QLORA_QUANT_THREADS + threadIdx.x) * e;
    float vals[16];
    float local = -QLORA_FLT_MAX;
    for (unsigned int k = 0; k < e; ++k) {
        u64 i = first + k;
        float v = i < a.n ? to_f32(x[i]) : 0.0f;
        vals[k] = v;
        local = fmaxf(local, abs_ftz(v));
    }
    const float amax = segment_max_block(local, bs / e, scratch);
    const u64 qblock = first / bs;
    if (first % bs == 0 && qblock < (a.n + bs - 1) / bs) absmax[qblock] = amax;
    const float inv = rcp_approx_ftz(amax);
    for (unsigned int k = 0; k < e; ++k) {
        u64 i = first + k;
        if (i >= a.n) break;
        out[i] = quantize_dynamic(smem_code, mul_ftz(vals[k], inv));
    }
}

template <typename T>
__device__ void dequantize_8bit(const unsigned char* __restrict__ q,
                                const float* __restrict__ code,
                                const float* __restrict__ absmax, T* __restrict__ out,
                                QloraBlockwise8Args a) {
    __shared__ float smem_code[QLORA_DYNAMIC_MAP_LEN];
    smem_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const u64 i = (u64)blockIdx.x * QLORA_DEQUANT_THREADS + threadIdx.x;
    if (i >= a.n) return;
    out[i] = from_f32<T>(__fmul_rn(smem_code[q[i]], absmax[i / a.blocksize]));
}

#define QLORA_BLOCKWISE8(SUFFIX, T)                                                              \
    extern "C" __global__ void __launch_bounds__(QLORA_QUANT_THREADS)                            \
    quantize_8bit_##SUFFIX(const T* x, const float* code, unsigned char* out, float* absmax,     \
                           QloraBlockwise8Args a) {                                              \
        quantize_8bit<T>(x, code, out, absmax, a);                                               \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(QLORA_DEQUANT_THREADS)                          \
    dequantize_8bit_##SUFFIX(const unsigned char* q, const float* code, const float* absmax,    \
                             T* out, QloraBlockwise8Args a) {                                    \
        dequantize_8bit<T>(q, code, absmax, out, a);                                             \
    }
QLORA_BLOCKWISE8(f32, float)
QLORA_BLOCKWISE8(f16, f16_t)
QLORA_BLOCKWISE8(bf16, bf16_t)
