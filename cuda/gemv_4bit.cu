/*
 * gemv_4bit.cu -- fused NF4/FP4 dequantize + matrix-vector (small batch) product
 * (the role of bnb kgemm_4bit_inference_naive, section 8, with f32 dequantization).
 *
 * Launch contract:
 *   kernels  gemv_4bit_f32 / _f16 / _bf16
 *            (const T* a, const unsigned char* packed_w, const float* absmax,
 *             const unsigned char* qabsmax, const float* nested_absmax,
 *             const float* nested_code, T* out, QloraGemv4Args args)
 *   block    QLORA_GEMV_WARPS * 32 = 128 threads
 *   grid     ceil(out_features / 4)
 *   owns     warp w of CUDA block b computes output feature j = 4b + w for all rows. When
 *            K % 8 == 0 (and packed_w is 4-byte aligned) lane l takes the in-features
 *            8l .. 8l + 7 of each 256-wide step with one 4-byte weight load; otherwise
 *            k = l, l + 32, ... one nibble at a time. Lanes' partial sums are combined with a
 *            butterfly shuffle and lane 0 stores out[m * N + j]
 *   shapes   a: [rows, K] row-major, W: [N, K] row-major quantized as one flat tensor of N*K
 *            elements (element (j, k) is flat index j*K + k), out: [rows, N];
 *            rows in 1..QLORA_GEMV_MAX_ROWS
 *
 * Weights are dequantized in f32 exactly as dequantize_4bit does (w = f32(code * scale)),
 * products a*w are f32 and accumulated in f32 (per lane in k order, then the butterfly),
 * the sum is converted to T with round-to-nearest-even. Not bitwise equal to a CPU dot product
 * in another summation order; compare with a tolerance.
 */
#include "qlora_kernels.h"
#include "common.cuh"

template <typename T>
__device__ void gemv_4bit(const T* __restrict__ a, const unsigned char* __restrict__ packed_w,
                          const float* __restrict__ absmax,
                          const unsigned char* __restrict__ qabsmax,
                          const float* __restrict__ nested_absmax,
                          const float* __restrict__ nested_code, T* __restrict__ out,
                          QloraGemv4Args args) {
    // Code book in shared memory: lanes index it with different codes, which a __constant__
    // table would serialise.
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = dequantize_4bit_code(threadIdx.x, args.quant_type);
    __syncthreads();
    const unsigned int warp = threadIdx.x / 32;
    const unsigned int lane = threadIdx.x & 31u;
    const u64 j = (u64)blockIdx.x * QLORA_GEMV_WARPS + warp;
    if (j >= args.out_features) return;  // whole warp leaves together
    const u64 K = args.in_features;
    const unsigned int rows = args.rows;

    float acc[QLORA_GEMV_MAX_ROWS];
    for (unsigned int m = 0; m < QLORA_GEMV_MAX_ROWS; ++m) acc[m] = 0.0f;

    const bool vectorised = (K % 8 == 0) && (((u64)packed_w & 3ull) == 0);
    if (vectorised) {
        // Lane l takes the 8 consecutive in-features 8l .. 8l + 7 of every 256-wide step: one
        // 4-byte weight load per lane, 128 contiguous bytes per warp. The 8 share one block
        // (blocksize >= 32 is a multiple of 8 and so is the row start j*K).
        const unsigned int* w32 = reinterpret_cast<const unsigned int*>(packed_w + (j * K) / 2);
        for (u64 k0 = 8ull * lane; k0 < K; k0 += 256) {
            const float scale = block_scale((j * K + k0) / args.blocksize, absmax, qabsmax,
                                            nested_absmax, nested_code, args.double_quant,
                                            args.offset);
            const unsigned int word = w32[k0 / 8];
            float w[8];
            for (int b = 0; b < 4; ++b) {
                const unsigned int byte = (word >> (8 * b)) & 0xffu;
                w[2 * b] = mul_ftz(lut[byte >> 4], scale);
                w[2 * b + 1] = mul_ftz(lut[byte & 15u], scale);
            }
            for (unsigned int m = 0; m < QLORA_GEMV_MAX_ROWS; ++m) {
                if (m >= rows) break;
                const T* am = a + m * K + k0;
                for (int t = 0; t < 8; ++t) {
                    acc[m] = __fadd_rn(acc[m], __fmul_rn(to_f32(am[t]), w[t]));
                }
            }
        }
    } else {
        u64 cached_block = ~0ull;
        float scale = 0.0f;
        for (u64 k = lane; k < K; k += 32) {
            const u64 e = j * K + k;
            const u64 blk = e / args.blocksize;
            if (blk != cached_block) {
                scale = block_scale(blk, absmax, qabsmax, nested_absmax, nested_code,
                                    args.double_quant, args.offset);
                cached_block = blk;
            }
            const unsigned int byte = packed_w[e >> 1];
            const unsigned int code = (e & 1ull) ? (byte & 15u) : (byte >> 4);
            const float w = mul_ftz(lut[code], scale);
            for (unsigned int m = 0; m < QLORA_GEMV_MAX_ROWS; ++m) {
                if (m < rows) acc[m] = __fadd_rn(acc[m], __fmul_rn(to_f32(a[m * K + k]), w));
            }
        }
    }
    for (unsigned int m = 0; m < QLORA_GEMV_MAX_ROWS; ++m) {
        float v = acc[m];
        for (unsigned int offset = 16; offset > 0; offset /= 2) {
            v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, offset));
        }
        if (lane == 0 && m < rows) out[(u64)m * args.out_features + j] = from_f32<T>(v);
    }
}

#define QLORA_GEMV4(SUFFIX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(QLORA_GEMV_WARPS * 32)                          \
    gemv_4bit_##SUFFIX(const T* a, const unsigned char* packed_w, const float* absmax,           \
                       const unsigned char* qabsmax, const float* nested_absmax,                 \
                       const float* nested_code, T* out, QloraGemv4Args args) {                  \
        gemv_4bit<T>(a, packed_w, absmax, qabsmax, nested_absmax, nested_code, out, args);       \
    }
QLORA_GEMV4(f32, float)
QLORA_GEMV4(f16, f16_t)
QLORA_GEMV4(bf16, bf16_t)
