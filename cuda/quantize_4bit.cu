/*
 * quantize_4bit.cu -- blockwise NF4/FP4 quantization (bnb kQuantizeBlockwise, section 2.2).
 *
 * Launch contract:
 *   kernels  quantize_4bit_f32 / quantize_4bit_f16 / quantize_4bit_bf16
 *            (const T* x, unsigned char* packed, float* absmax, QloraQuant4Args a)
 *   block    QLORA_QUANT_THREADS (256) threads, no dynamic shared memory
 *   grid     ceil(a.n / (256 * E)) with E = max(2, a.blocksize / 256) elements per thread
 *   owns     thread t of CUDA block b owns the E consecutive elements starting at
 *            (b * 256 + t) * E; a quantization block is a.blocksize / E consecutive threads,
 *            so one CUDA block holds 256 * E / blocksize quantization blocks (1 when bs >= 512)
 *   writes   absmax[ceil(n / bs)] (f32, the max ftz(|x|) of the block, padding zeros included)
 *            and packed[(n + 1) / 2] (element 2k in the HIGH nibble of byte k, 2k + 1 in the low)
 *   requires blocksize a power of two in [32, 4096]; checked by the Rust launcher
 *
 * Per block, exactly as bitsandbytes' CUDA build (--use_fast_math) computes it (reference notes
 * section 12): absmax = max(ftz(|x|)) (NaN dropped by fmaxf), inv = rcp.approx.ftz(absmax)
 * (MUFU.RCP, not the IEEE reciprocal), xn = ftz(ftz(x) * inv) (mul.rn.ftz), code from the
 * strict-> tree with the CUDA NF4 thresholds. All-zero block: rcp(0) = inf, 0 * inf = NaN,
 * NaN -> code 0 (bytes 0x00). NaN inputs get code 0; an Inf makes the scale 0 so finite values
 * get NF4 code 7 and the Inf itself code 0 (section 2.5). For FP4 a negative product that
 * underflows is -0.0 and gets code 0.
 */
#include "qlora_kernels.h"
#include "common.cuh"

template <typename T>
__device__ void quantize_4bit(const T* __restrict__ x, unsigned char* __restrict__ packed,
                              float* __restrict__ absmax, QloraQuant4Args a) {
    __shared__ float scratch[QLORA_QUANT_THREADS / 32];
    const unsigned int bs = a.blocksize;
    const unsigned int e = quant_items_per_thread(bs);
    const unsigned int threads_per_block = bs / e;
    const u64 first = ((u64)blockIdx.x * QLORA_QUANT_THREADS + threadIdx.x) * e;

    float vals[16];
    float local = -QLORA_FLT_MAX;
    for (unsigned int k = 0; k < e; ++k) {
        u64 i = first + k;
        float v = i < a.n ? to_f32(x[i]) : 0.0f;
        vals[k] = v;
        local = fmaxf(local, abs_ftz(v));
    }
    const float amax = segment_max_block(local, threads_per_block, scratch);
    const u64 qblock = first / bs;
    const u64 nblocks = (a.n + bs - 1) / bs;
    if (first % bs == 0 && qblock < nblocks) absmax[qblock] = amax;

    const float inv = rcp_approx_ftz(amax);
    for (unsigned int k = 0; k < e; k += 2) {
        u64 i = first + k;
        if (i >= a.n) break;
        unsigned char hi = quantize_4bit_code(mul_ftz(vals[k], inv), a.quant_type);
        unsigned char lo = quantize_4bit_code(mul_ftz(vals[k + 1], inv), a.quant_type);
        packed[i / 2] = (unsigned char)((hi << 4) | lo);
    }
}

extern "C" __global__ void __launch_bounds__(QLORA_QUANT_THREADS)
quantize_4bit_f32(const float* x, unsigned char* packed, float* absmax, QloraQuant4Args a) {
    quantize_4bit<float>(x, packed, absmax, a);
}
extern "C" __global__ void __launch_bounds__(QLORA_QUANT_THREADS)
quantize_4bit_f16(const f16_t* x, unsigned char* packed, float* absmax, QloraQuant4Args a) {
    quantize_4bit<f16_t>(x, packed, absmax, a);
}
extern "C" __global__ void __launch_bounds__(QLORA_QUANT_THREADS)
quantize_4bit_bf16(const bf16_t* x, unsigned char* packed, float* absmax, QloraQuant4Args a) {
    quantize_4bit<bf16_t>(x, packed, absmax, a);
}
