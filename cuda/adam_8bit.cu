/*
 * adam_8bit.cu -- one fused Adam/AdamW step with blockwise 8-bit states
 * (bnb kOptimizerStatic8bit2StateBlockwise<T, ADAM, 256, 1>, sections 6.2-6.3).
 *
 * Launch contract:
 *   kernels  adam8bit_step_f32 / _f16 / _bf16
 *            (T* p, const T* g, unsigned char* state1, unsigned char* state2, float* absmax1,
 *             float* absmax2, const float* qmap1, const float* qmap2, QloraAdamArgs a)
 *   block    QLORA_OPT8_BLOCKSIZE (256) threads; 2 KiB static shared memory (both maps)
 *   grid     ceil(a.n / 256): CUDA block b owns state block b (elements 256b .. 256b + 255)
 *   owns     thread t owns element 256b + t; lanes past n take part in the absmax reduction
 *            with g = 0, state1 code 128, state2 code 0 (bnb's padding) and store nothing
 *   in/out   p, state1, state2 (n entries), absmax1/absmax2 (ceil(n / 256) entries, old values
 *            read before the block's barrier, new values written by thread 0)
 *   maps     qmap1 = signed dynamic map, qmap2 = unsigned dynamic map (256 entries each)
 *
 * Per element, f32, evaluated exactly in this order (IEEE ops, no FMA contraction):
 *   c1, c2 = the host-computed bias corrections of QloraAdamArgs; step_size = (-lr * c2) / c1
 *   if g finite: g = g * gnorm_scale
 *                s2 = (qmap2[c2_old] * absmax2_old) * beta2 + ((1 - beta2) * g) * g
 *                s1 = (qmap1[c1_old] * absmax1_old) * beta1 + (1 - beta1) * g
 *   else         s1 = s2 = 0 (state reset, p untouched)
 *   absmax1 = max |s1| over the block, absmax2 = max |s2| (NaN-dropping fmaxf)
 *   if g finite: p = T(p + step_size * (s1 / (sqrtf(s2) + c2 * eps)))
 *                if weight_decay > 0: p = T(p * (1 - lr * weight_decay))   (decoupled, after)
 *   c1_new = nearest(qmap1, s1 / absmax1); c2_new = nearest(qmap2, s2 / absmax2)
 *   if signbit(qmap1[c1_new]) != signbit(s1): c1_new += s1 > 0 ? 1 : -1 (wrapping u8)
 * bnb uses __powf/__fdividef/fast sqrtf in the kernel; here the bias corrections come from the
 * host and division and sqrt are IEEE, so a CPU oracle can match the kernel bit for bit.
 */
#include "qlora_kernels.h"
#include "common.cuh"

template <typename T>
__device__ void adam8bit_step(T* __restrict__ p, const T* __restrict__ g,
                              unsigned char* __restrict__ state1,
                              unsigned char* __restrict__ state2, float* __restrict__ absmax1,
                              float* __restrict__ absmax2, const float* __restrict__ qmap1,
                              const float* __restrict__ qmap2, QloraAdamArgs a) {
    __shared__ float smem_q1[QLORA_DYNAMIC_MAP_LEN];
    __shared__ float smem_q2[QLORA_DYNAMIC_MAP_LEN];
    __shared__ float scratch1[QLORA_OPT8_BLOCKSIZE / 32];
    __shared__ float scratch2[QLORA_OPT8_BLOCKSIZE / 32];
    smem_q1[threadIdx.x] = qmap1[threadIdx.x];
    smem_q2[threadIdx.x] = qmap2[threadIdx.x];

    const u64 block = blockIdx.x;
    const u64 i = block * QLORA_OPT8_BLOCKSIZE + threadIdx.x;
    const bool valid = i < a.n;
    const float old_absmax1 = absmax1[block];
    const float old_absmax2 = absmax2[block];
    __syncthreads();

    const float c1 = a.c1;
    const float c2 = a.c2;
    const float step_size = (-a.lr * c2) / c1;

    float grad = valid ? to_f32(g[i]) : 0.0f;
    const unsigned char c1_old = valid ? state1[i] : (unsigned char)128;
    const unsigned char c2_old = valid ? state2[i] : (unsigned char)0;
    const bool finite = !isnan(grad) && !isinf(grad);
    float s1 = 0.0f;
    float s2 = 0.0f;
    if (finite) {
        grad = grad * a.gnorm_scale;
        s2 = smem_q2[c2_old] * old_absmax2;
        s2 = s2 * a.beta2 + ((1.0f - a.beta2) * grad) * grad;
        s1 = smem_q1[c1_old] * old_absmax1;
        s1 = s1 * a.beta1 + (1.0f - a.beta1) * grad;
    }

    // Both reductions read the same scratch layout; segment_max_block synchronises.
    const float new_absmax1 = segment_max_block(fabsf(s1), QLORA_OPT8_BLOCKSIZE, scratch1);
    const float new_absmax2 = segment_max_block(fabsf(s2), QLORA_OPT8_BLOCKSIZE, scratch2);
    if (threadIdx.x == 0) {
        absmax1[block] = new_absmax1;
        absmax2[block] = new_absmax2;
    }
    if (!valid) return;

    if (finite) {
        float pf = to_f32(p[i]);
        pf = pf + step_size * (s1 / (sqrtf(s2) + c2 * a.eps));
        T updated = from_f32<T>(pf);
        if (a.weight_decay > 0.0f) {
            updated = from_f32<T>(to_f32(updated) * (1.0f - a.lr * a.weight_decay));
        }
        p[i] = updated;
    }
    unsigned char c1_new = quantize_dynamic(smem_q1, s1 / new_absmax1);
    const unsigned char c2_new = quantize_dynamic(smem_q2, s2 / new_absmax2);
    if ((signbit(smem_q1[c1_new]) != 0) != (signbit(s1) != 0)) {
        c1_new = (unsigned char)(c1_new + (s1 > 0.0f ? 1 : -1));
    }
    state1[i] = c1_new;
    state2[i] = c2_new;
}

#define QLORA_ADAM8(SUFFIX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(QLORA_OPT8_BLOCKSIZE)                           \
    adam8bit_step_##SUFFIX(T* p, const T* g, unsigned char* state1, unsigned char* state2,       \
                           float* absmax1, float* absmax2, const float* qmap1,                   \
                           const float* qmap2, QloraAdamArgs a) {                                \
        adam8bit_step<T>(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, a);               \
    }
QLORA_ADAM8(f32, float)
QLORA_ADAM8(f16, f16_t)
QLORA_ADAM8(bf16, bf16_t)
