/*
 * dequantize_4bit.cu -- NF4/FP4 dequantization, optionally with the double-quantized absmax
 * rebuilt on the fly (bnb kDequantizeBlockwise + dequantize_blockwise of absmax, sections 3, 4.4).
 *
 * Launch contract:
 *   kernels  dequantize_4bit_f32 / dequantize_4bit_f16 / dequantize_4bit_bf16
 *            (const unsigned char* packed, const float* absmax, const unsigned char* qabsmax,
 *             const float* nested_absmax, const float* nested_code, T* out, QloraDequant4Args a)
 *   block    QLORA_DEQUANT_THREADS (256) threads
 *   grid     ceil(((a.n + 1) / 2) / 256)
 *   owns     thread i (global) owns packed byte i and writes out[2i] and, if 2i + 1 < n,
 *            out[2i + 1]; both lie in block (2i) / blocksize because blocksize is even
 *   requires blocksize a power of two in [32, 4096]; with double_quant, qabsmax has
 *            ceil(n / bs) entries, nested_absmax ceil(that / 256), nested_code 256
 *
 * out = T(f32(code_value * scale)), one IEEE f32 multiply then a round-to-nearest-even
 * conversion; with double quantization scale = f32(f32(nested_code[q] * nested_absmax) + offset)
 * with two roundings (__fmul_rn, __fadd_rn), never one FMA.
 */
#include "qlora_kernels.h"
#include "common.cuh"

template <typename T>
__device__ void dequantize_4bit(const unsigned char* __restrict__ packed,
                                const float* __restrict__ absmax,
                                const unsigned char* __restrict__ qabsmax,
                                const float* __restrict__ nested_absmax,
                                const float* __restrict__ nested_code, T* __restrict__ out,
                                QloraDequant4Args a) {
    const u64 byte = (u64)blockIdx.x * QLORA_DEQUANT_THREADS + threadIdx.x;
    const u64 i = byte * 2;
    if (i >= a.n) return;
    const float scale = block_scale(i / a.blocksize, absmax, qabsmax, nested_absmax, nested_code,
                                    a.double_quant, a.offset);
    const unsigned int b = packed[byte];
    out[i] = from_f32<T>(__fmul_rn(dequantize_4bit_code(b >> 4, a.quant_type), scale));
    if (i + 1 < a.n) {
        out[i + 1] = from_f32<T>(__fmul_rn(dequantize_4bit_code(b & 15u, a.quant_type), scale));
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
