/*
 * dequantize_4bit.cu -- NF4/FP4 dequantization, optionally with the double-quantized absmax
 * rebuilt on the fly (bnb kDequantizeBlockwise + dequantize_blockwise of absmax, sections 3, 4.4).
 *
 * Launch contract:
 *   kernels  dequantize_4bit_f32 / dequantize_4bit_f16 / dequantize_4bit_bf16
 *            (const unsigned char* packed, const float* absmax, const unsigned char* qabsmax,
 *             const float* nested_absmax, const float* nested_code, T* out, QloraDequant4Args a)
 *   block    QLORA_DEQUANT_THREADS (256) threads; 64 B static shared memory (the code book)
 *   grid     ceil(((a.n + 1) / 2) / (256 * QLORA_DEQUANT_BYTES_PER_THREAD))
 *   owns     thread i (global) owns the 8 packed bytes 8i .. 8i + 7 and writes the 16 outputs
 *            16i .. 16i + 15 (fewer at the end of the tensor). The 16 outputs share one
 *            quantization block because blocksize >= 32 is a multiple of 16, so the thread
 *            computes one scale. When packed and out are aligned (8 and 16 bytes) and all 16
 *            outputs exist, it uses one 8-byte load and 16-byte stores; otherwise byte by byte.
 *   requires blocksize a power of two in [32, 4096]; with double_quant, qabsmax has
 *            ceil(n / bs) entries, nested_absmax ceil(that / 256), nested_code 256
 *
 * out = T(f32(code_value * scale)), one f32 multiply with a subnormal product flushed to zero
 * (mul.rn.ftz, as bitsandbytes' --use_fast_math build; NaN is the GPU's 0x7fffffff) then a
 * round-to-nearest-even conversion; with double quantization
 * scale = f32(ftz(nested_code[q] * nested_absmax) + offset) with two roundings (mul_ftz,
 * __fadd_rn), never one FMA. The code book sits in shared memory:
 * a __constant__ table would serialise a warp's 16 different addresses.
 */
#include "qlora_kernels.h"
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void store16(T* out, const float* v);

template <>
__device__ __forceinline__ void store16<float>(float* out, const float* v) {
    float4* o = reinterpret_cast<float4*>(out);
    for (int q = 0; q < 4; ++q) o[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
}

__device__ __forceinline__ unsigned int pack_pair(unsigned short lo, unsigned short hi) {
    return (unsigned int)lo | ((unsigned int)hi << 16);
}

template <typename H>
__device__ __forceinline__ void store16_half(H* out, const float* v) {
    unsigned int w[8];
    for (int q = 0; q < 8; ++q) {
        w[q] = pack_pair(from_f32<H>(v[2 * q]).bits, from_f32<H>(v[2 * q + 1]).bits);
    }
    uint4* o = reinterpret_cast<uint4*>(out);
    o[0] = make_uint4(w[0], w[1], w[2], w[3]);
    o[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

template <>
__device__ __forceinline__ void store16<f16_t>(f16_t* out, const float* v) {
    store16_half<f16_t>(out, v);
}
template <>
__device__ __forceinline__ void store16<bf16_t>(bf16_t* out, const float* v) {
    store16_half<bf16_t>(out, v);
}

template <typename T>
__device__ void dequantize_4bit(const unsigned char* __restrict__ packed,
                                const float* __restrict__ absmax,
                                const unsigned char* __restrict__ qabsmax,
                                const float* __restrict__ nested_absmax,
                                const float* __restrict__ nested_code, T* __restrict__ out,
                                QloraDequant4Args a) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = dequantize_4bit_code(threadIdx.x, a.quant_type);
    __syncthreads();

    const u64 first_byte =
        ((u64)blockIdx.x * QLORA_DEQUANT_THREADS + threadIdx.x) * QLORA_DEQUANT_BYTES_PER_THREAD;
    const u64 first = first_byte * 2;
    if (first >= a.n) return;
    const float scale = block_scale(first / a.blocksize, absmax, qabsmax, nested_absmax,
                                    nested_code, a.double_quant, a.offset);
    const bool aligned = (((u64)packed | (first_byte & 7ull)) & 7ull) == 0 &&
                         ((u64)(out + first) & 15ull) == 0;
    if (aligned && first + 16 <= a.n) {
        const uint2 raw = *reinterpret_cast<const uint2*>(packed + first_byte);
        float v[16];
        for (int b = 0; b < 8; ++b) {
            const unsigned int byte = ((b < 4 ? raw.x : raw.y) >> (8 * (b & 3))) & 0xffu;
            v[2 * b] = mul_ftz(lut[byte >> 4], scale);
            v[2 * b + 1] = mul_ftz(lut[byte & 15u], scale);
        }
        store16<T>(out + first, v);
        return;
    }
    for (int b = 0; b < QLORA_DEQUANT_BYTES_PER_THREAD; ++b) {
        const u64 i = first + 2 * (u64)b;
        if (i >= a.n) break;
        const unsigned int byte = packed[first_byte + b];
        out[i] = from_f32<T>(mul_ftz(lut[byte >> 4], scale));
        if (i + 1 < a.n) out[i + 1] = from_f32<T>(mul_ftz(lut[byte & 15u], scale));
    }
}

#define QLORA_DEQUANT4(NAME, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(QLORA_DEQUANT_THREADS)                          \
    NAME(const unsigned char* packed, const float* absmax, const unsigned char* qabsmax,         \
         const float* nested_absmax, const float* nested_code, T* out, QloraDequant4Args a) {    \
        dequantize_4bit<T>(packed, absmax, qabsmax, nested_absmax, nested_code, out, a);        \
    }
QLORA_DEQUANT4(dequantize_4bit_f32, float)
QLORA_DEQUANT4(dequantize_4bit_f16, f16_t)
QLORA_DEQUANT4(dequantize_4bit_bf16, bf16_t)
