/*
 * common.cuh -- device helpers shared by every kernel source in this folder: element types and
 * their exact conversions, the 4-bit code books and decision trees, the dynamic-map search, and
 * the block reductions. No launch contract of its own; textually included (after
 * qlora_kernels.h) by every .cu file, so the Rust side can hand NVRTC one self-contained source.
 *
 * Numerics: compiled WITHOUT fast math (IEEE division, sqrt and reciprocal, no flush to zero)
 * and with --fmad=false, so every f32 expression rounds exactly as written; kernels spell the
 * roundings that matter with __fmul_rn / __fadd_rn anyway. Where bitsandbytes' own CUDA build
 * (compiled with --use_fast_math) differs, the quantize/dequantize kernels reproduce it
 * explicitly with the PTX below: the approximate reciprocal rcp.approx.ftz.f32 (MUFU.RCP) and
 * flush-to-zero multiplies, so that GPU == CPU == bitsandbytes-on-a-GPU byte for byte.
 */
#ifndef QLORA_COMMON_CUH
#define QLORA_COMMON_CUH

#define QLORA_FLT_MAX 3.402823466e+38f

typedef unsigned long long u64;

/* ---- bitsandbytes' fast math (its CUDA library is built with --use_fast_math) ------------ */
/* 1.0f / x under --use_fast_math: MUFU.RCP, subnormal inputs and results flushed to zero. */
__device__ __forceinline__ float rcp_approx_ftz(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
/* a * b rounded to nearest with subnormal operands and result flushed to signed zero. */
__device__ __forceinline__ float mul_ftz(float a, float b) {
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
/* |x| with a subnormal x flushed to zero (NaN stays NaN). */
__device__ __forceinline__ float abs_ftz(float x) {
    float r;
    asm("abs.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

/* 16-bit element types as bit containers: conversions below need no CUDA header. */
struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
/* Round to nearest even (PTX cvt.rn), like __float2half_rn. */
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
/* Round to nearest even; NaN keeps its payload and is made quiet (as the `half` crate does). */
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    unsigned int u = __float_as_uint(x);
    bf16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x0040u);
        return b;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = (unsigned short)(u >> 16);
    return b;
}

/* ---- 4-bit code books ------------------------------------------------------------------ */

__device__ __constant__ float QLORA_NF4_LUT[16] = {
    QLORA_NF4_CODE_0, QLORA_NF4_CODE_1, QLORA_NF4_CODE_2, QLORA_NF4_CODE_3,
    QLORA_NF4_CODE_4, QLORA_NF4_CODE_5, QLORA_NF4_CODE_6, QLORA_NF4_CODE_7,
    QLORA_NF4_CODE_8, QLORA_NF4_CODE_9, QLORA_NF4_CODE_10, QLORA_NF4_CODE_11,
    QLORA_NF4_CODE_12, QLORA_NF4_CODE_13, QLORA_NF4_CODE_14, QLORA_NF4_CODE_15};

__device__ __constant__ float QLORA_FP4_LUT[8] = {
    QLORA_FP4_LUT_0, QLORA_FP4_LUT_1, QLORA_FP4_LUT_2, QLORA_FP4_LUT_3,
    QLORA_FP4_LUT_4, QLORA_FP4_LUT_5, QLORA_FP4_LUT_6, QLORA_FP4_LUT_7};

/* Section 2.3: strict x > T tree; NaN fails every test and lands on code 0. */
__device__ __forceinline__ unsigned char quantize_nf4(float x) {
    if (x > QLORA_NF4_T8) {
        if (x > QLORA_NF4_T12) {
            if (x > QLORA_NF4_T14) return x > QLORA_NF4_T15 ? 15 : 14;
            return x > QLORA_NF4_T13 ? 13 : 12;
        }
        if (x > QLORA_NF4_T10) return x > QLORA_NF4_T11 ? 11 : 10;
        return x > QLORA_NF4_T9 ? 9 : 8;
    }
    if (x > QLORA_NF4_T4) {
        if (x > QLORA_NF4_T6) return x > QLORA_NF4_T7 ? 7 : 6;
        return x > QLORA_NF4_T5 ? 5 : 4;
    }
    if (x > QLORA_NF4_T2) return x > QLORA_NF4_T3 ? 3 : 2;
    return x > QLORA_NF4_T1 ? 1 : 0;
}

/* Section 2.4: sign from strict x < 0 (-0.0 and NaN are positive), then a strict > tree on |x|. */
__device__ __forceinline__ unsigned char quantize_fp4(float x) {
    unsigned char sign = x < 0.0f ? 8 : 0;
    float m = fabsf(x);
    unsigned char code;
    if (m > QLORA_FP4_T_ROOT) {
        if (m > QLORA_FP4_T_HIGH) code = m > QLORA_FP4_T_HIGH_HIGH ? 3 : 2;
        else code = m > QLORA_FP4_T_HIGH_LOW ? 5 : 4;
    } else {
        if (m > QLORA_FP4_T_LOW) code = m > QLORA_FP4_T_LOW_HIGH ? 7 : 6;
        else code = m > QLORA_FP4_T_LOW_LOW ? 1 : 0;
    }
    return code + sign;
}

__device__ __forceinline__ unsigned char quantize_4bit_code(float x, unsigned int quant_type) {
    return quant_type == QLORA_QUANT_FP4 ? quantize_fp4(x) : quantize_nf4(x);
}

/* Code value before scaling; FP4 code 8 is -0.0 as in the bnb kernel. */
__device__ __forceinline__ float dequantize_4bit_code(unsigned int code, unsigned int quant_type) {
    if (quant_type == QLORA_QUANT_FP4) {
        float v = QLORA_FP4_LUT[code & 7u];
        return (code & 8u) ? -v : v;
    }
    return QLORA_NF4_LUT[code & 15u];
}

/* Scale of 4-bit block j: plain, or rebuilt from double quantization with two roundings
 * (section 4.4) -- never one FMA; the product flushes a subnormal result as bnb's kernel does. */
__device__ __forceinline__ float block_scale(u64 j, const float* absmax,
                                             const unsigned char* qabsmax,
                                             const float* nested_absmax,
                                             const float* nested_code,
                                             unsigned int double_quant, float offset) {
    if (!double_quant) return absmax[j];
    /* bnb's dequantize_blockwise kernel (fast math: ftz product), then torch's IEEE add. */
    float scaled = mul_ftz(nested_code[qabsmax[j]], nested_absmax[j / QLORA_NESTED_BLOCKSIZE]);
    return __fadd_rn(scaled, offset);
}

/* ---- Dynamic 8-bit map search (section 4.3, bnb dQuantize<0>) ------------------------- */
/* Nearest entry of the sorted 256-entry `code`; exact ties go to the even index; values past
 * either end clamp; NaN gives index 0. */
__device__ __forceinline__ unsigned char quantize_dynamic(const float* code, float x) {
    int pivot = 127;
    int upper_pivot = 255;
    int lower_pivot = 0;
    float lower = -1.0f;
    float upper = 1.0f;
    float val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > val) {
        float midpoint = __fmul_rn(__fadd_rn(upper, val), 0.5f);
        return (unsigned char)(x > midpoint ? upper_pivot : pivot);
    }
    float midpoint = __fmul_rn(__fadd_rn(lower, val), 0.5f);
    return (unsigned char)(x < midpoint ? lower_pivot : pivot);
}

/* ---- Reductions --------------------------------------------------------------------------- */

/* Max over aligned segments of `width` lanes (a power of two <= 32) of one warp; every lane of
 * the segment gets the result. fmaxf drops NaN, as bnb's thread-local fold does. */
__device__ __forceinline__ float segment_max_warp(float v, unsigned int width) {
    for (unsigned int offset = width / 2; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

/* Max over aligned segments of `width` threads (power of two, <= blockDim.x = 256) of the CUDA
 * block. Must be reached by every thread of the block (it synchronises when width > 32).
 * `scratch` holds blockDim.x / 32 floats of shared memory. */
__device__ __forceinline__ float segment_max_block(float v, unsigned int width, float* scratch) {
    if (width <= 32) return segment_max_warp(v, width);
    v = segment_max_warp(v, 32);
    unsigned int warp = threadIdx.x / 32;
    if ((threadIdx.x & 31u) == 0) scratch[warp] = v;
    __syncthreads();
    unsigned int warps_per_segment = width / 32;
    unsigned int first = (warp / warps_per_segment) * warps_per_segment;
    float m = -QLORA_FLT_MAX;
    for (unsigned int w = 0; w < warps_per_segment; ++w) m = fmaxf(m, scratch[first + w]);
    __syncthreads();
    return m;
}

/* Elements each thread of a blockwise quantizer owns: at least one byte's worth (2 values) and
 * at most QLORA_MAX_BLOCKSIZE / QLORA_QUANT_THREADS = 16. */
__device__ __forceinline__ unsigned int quant_items_per_thread(unsigned int blocksize) {
    unsigned int e = blocksize / QLORA_QUANT_THREADS;
    return e < 2u ? 2u : e;
}

#endif /* QLORA_COMMON_CUH */
