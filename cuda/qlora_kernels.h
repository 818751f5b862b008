/*
 * qlora_kernels.h -- the contract shared by the CUDA kernels in this folder and their Rust
 * launchers (crates/cuda). Rust sees this file through bindgen: crates/cuda/src/bindings.rs is
 * generated from it and committed; a test regenerates it and fails on any difference.
 *
 * Plain C only: NVRTC compiles it without any system header, and bindgen parses it as C.
 * Fixed-width types are spelled with the C basic types (unsigned int = 32 bits,
 * unsigned long long = 64 bits on every CUDA target) for the same reason.
 *
 * Semantics follow bitsandbytes 0.50.2 (shared/docs/reference/bitsandbytes.md, sections cited).
 */
#ifndef QLORA_KERNELS_H
#define QLORA_KERNELS_H

/* ---- Block sizes and launch shapes ------------------------------------------------------- */

/* Threads per CUDA block of the blockwise quantizers (4-bit and 8-bit). */
#define QLORA_QUANT_THREADS 256
/* Smallest and largest quantization block sizes accepted (powers of two). */
#define QLORA_MIN_BLOCKSIZE 32
#define QLORA_MAX_BLOCKSIZE 4096
/* Smallest block size of the 8-bit blockwise codec (bnb: 64). */
#define QLORA_MIN_BLOCKSIZE_8BIT 64
/* Threads per CUDA block of the dequantizers. */
#define QLORA_DEQUANT_THREADS 256
/* Packed bytes (2 values each) one thread of the 4-bit dequantizer owns. */
#define QLORA_DEQUANT_BYTES_PER_THREAD 8
/* Block size of the nested (double) quantization of absmax (section 4.1). */
#define QLORA_NESTED_BLOCKSIZE 256
/* 8-bit optimizer: one CUDA block of 256 threads per 256-element state block (section 6.2). */
#define QLORA_OPT8_BLOCKSIZE 256
/* 32-bit optimizer: 1024 threads x 4 elements per CUDA block (section 6.4). */
#define QLORA_OPT32_THREADS 1024
#define QLORA_OPT32_ITEMS 4
/* Fused 4-bit GEMV: one warp per output feature, 4 warps per CUDA block, at most 8 rows. */
#define QLORA_GEMV_WARPS 4
#define QLORA_GEMV_MAX_ROWS 8
/* Entries of a dynamic 8-bit map (section 4.2 and appendix A). */
#define QLORA_DYNAMIC_MAP_LEN 256

/* ---- Enumerations ------------------------------------------------------------------------- */

/* Element type of a tensor in memory. */
typedef enum QloraDtype {
    QLORA_DTYPE_F32 = 0,
    QLORA_DTYPE_F16 = 1,
    QLORA_DTYPE_BF16 = 2
} QloraDtype;

/* 4-bit code book. */
typedef enum QloraQuantType {
    QLORA_QUANT_NF4 = 0,
    QLORA_QUANT_FP4 = 1
} QloraQuantType;

/* ---- NF4 code book (section 1.1) and thresholds (section 2.3, strict x > T) -------------- */

#define QLORA_NF4_CODE_0 -1.0f
#define QLORA_NF4_CODE_1 -0.6961928009986877f
#define QLORA_NF4_CODE_2 -0.5250730514526367f
#define QLORA_NF4_CODE_3 -0.39491748809814453f
#define QLORA_NF4_CODE_4 -0.28444138169288635f
#define QLORA_NF4_CODE_5 -0.18477343022823334f
#define QLORA_NF4_CODE_6 -0.09105003625154495f
#define QLORA_NF4_CODE_7 0.0f
#define QLORA_NF4_CODE_8 0.07958029955625534f
#define QLORA_NF4_CODE_9 0.16093020141124725f
#define QLORA_NF4_CODE_10 0.24611230194568634f
#define QLORA_NF4_CODE_11 0.33791524171829224f
#define QLORA_NF4_CODE_12 0.44070982933044434f
#define QLORA_NF4_CODE_13 0.5626170039176941f
#define QLORA_NF4_CODE_14 0.7229568362236023f
#define QLORA_NF4_CODE_15 1.0f

/* QLORA_NF4_T<i>: boundary between code i-1 and code i. */
#define QLORA_NF4_T1 -0.8480964004993439f
#define QLORA_NF4_T2 -0.6106329262256622f
#define QLORA_NF4_T3 -0.4599952697753906f
#define QLORA_NF4_T4 -0.33967943489551544f
#define QLORA_NF4_T5 -0.23460740596055984f
#define QLORA_NF4_T6 -0.13791173323988914f
#define QLORA_NF4_T7 -0.045525018125772476f
#define QLORA_NF4_T8 0.03979014977812767f
#define QLORA_NF4_T9 0.1202552504837513f
#define QLORA_NF4_T10 0.2035212516784668f
#define QLORA_NF4_T11 0.2920137718319893f
#define QLORA_NF4_T12 0.3893125355243683f
#define QLORA_NF4_T13 0.5016634166240692f
#define QLORA_NF4_T14 0.6427869200706482f
#define QLORA_NF4_T15 0.8614784181118011f

/* ---- FP4 (section 1.3: value = LUT[code & 7] * (code & 8 ? -1 : 1); section 2.4 tree) ---- */

#define QLORA_FP4_LUT_0 0.0f
#define QLORA_FP4_LUT_1 0.005208333333f
#define QLORA_FP4_LUT_2 0.66666667f
#define QLORA_FP4_LUT_3 1.0f
#define QLORA_FP4_LUT_4 0.33333333f
#define QLORA_FP4_LUT_5 0.5f
#define QLORA_FP4_LUT_6 0.16666667f
#define QLORA_FP4_LUT_7 0.25f

#define QLORA_FP4_T_ROOT 0.29166667f
#define QLORA_FP4_T_HIGH 0.583333f
#define QLORA_FP4_T_HIGH_HIGH 0.8333333f
#define QLORA_FP4_T_HIGH_LOW 0.4166667f
#define QLORA_FP4_T_LOW 0.0859375f
#define QLORA_FP4_T_LOW_HIGH 0.20833333f
#define QLORA_FP4_T_LOW_LOW 0.00260417f

/* ---- Kernel argument structs (passed by value; pointers are separate arguments) ---------- */

/* quantize_4bit_<T>(const T* x, unsigned char* packed, float* absmax, QloraQuant4Args a) */
typedef struct QloraQuant4Args {
    unsigned long long n;      /* elements of x */
    unsigned int blocksize;    /* power of two in [QLORA_MIN_BLOCKSIZE, QLORA_MAX_BLOCKSIZE] */
    unsigned int quant_type;   /* QloraQuantType */
} QloraQuant4Args;

/* dequantize_4bit_<T>(const unsigned char* packed, const float* absmax,
 *                     const unsigned char* qabsmax, const float* nested_absmax,
 *                     const float* nested_code, T* out, QloraDequant4Args a)
 * With double_quant == 0, absmax[j] is the f32 scale of block j and the three nested pointers
 * are ignored (may be null). With double_quant == 1, absmax is ignored and block j's scale is
 * f32(f32(nested_code[qabsmax[j]] * nested_absmax[j / 256]) + offset) (section 4.4). */
typedef struct QloraDequant4Args {
    unsigned long long n;
    unsigned int blocksize;
    unsigned int quant_type;
    unsigned int double_quant;
    float offset;
} QloraDequant4Args;

/* quantize_8bit_<T>(const T* x, const float* code, unsigned char* out, float* absmax, a)
 * dequantize_8bit_<T>(const unsigned char* q, const float* code, const float* absmax, T* out, a) */
typedef struct QloraBlockwise8Args {
    unsigned long long n;
    unsigned int blocksize;    /* power of two in [QLORA_MIN_BLOCKSIZE_8BIT, QLORA_MAX_BLOCKSIZE] */
    unsigned int reserved;     /* zero; keeps the struct 16 bytes on every ABI */
} QloraBlockwise8Args;

/* Hyper-parameters of one Adam/AdamW step (sections 6.3 and 6.4). All f32, as bnb passes them. */
typedef struct QloraAdamArgs {
    unsigned long long n;
    unsigned int step;         /* 1 for the first update */
    unsigned int skip_zeros;   /* 32-bit kernel only: leave elements with g == 0 untouched */
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;        /* decoupled, applied after the Adam update when > 0 */
    float gnorm_scale;         /* gradient multiplier (1.0 unless clipping) */
    /* Bias corrections, computed once on the host in f32 so a CPU oracle reproduces them
     * exactly (device powf is not correctly rounded):
     * c1 = 1 - beta1^step, c2 = sqrt(1 - beta2^step). */
    float c1;
    float c2;
} QloraAdamArgs;

/* adam8bit_step_<T>(T* p, const T* g, unsigned char* state1, unsigned char* state2,
 *                   float* absmax1, float* absmax2, const float* qmap1, const float* qmap2, a)
 * adam32bit_step_<T>(T* p, const T* g, float* state1, float* state2, a) */

/* gemv_4bit_<T>(const T* a, const unsigned char* packed_w, const float* absmax,
 *               const unsigned char* qabsmax, const float* nested_absmax,
 *               const float* nested_code, T* out, QloraGemv4Args args)
 * out[m][j] = sum_k a[m][k] * W[j][k], W ([out_features, in_features], row-major, flattened and
 * 4-bit quantized like any tensor) dequantized on the fly; scales as in QloraDequant4Args. */
typedef struct QloraGemv4Args {
    unsigned int rows;         /* M, 1..QLORA_GEMV_MAX_ROWS */
    unsigned int in_features;  /* K */
    unsigned int out_features; /* N */
    unsigned int blocksize;
    unsigned int quant_type;
    unsigned int double_quant;
    float offset;
    unsigned int reserved;
} QloraGemv4Args;

#endif /* QLORA_KERNELS_H */
