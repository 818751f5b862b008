/*
 * adam_32bit.cu -- one Adam/AdamW step with f32 states (bnb kOptimizer32bit2State<T, ADAM>,
 * section 6.4; no max_unorm / trust-ratio pre-pass: update_scale is 1).
 *
 * Launch contract:
 *   kernels  adam32bit_step_f32 / _f16 / _bf16
 *            (T* p, const T* g, float* state1, float* state2, QloraAdamArgs a)
 *   block    QLORA_OPT32_THREADS (1024) threads
 *   grid     ceil(a.n / 4096): CUDA block b covers elements 4096b .. 4096b + 4095
 *   owns     thread t owns elements 4096b + t + 1024k for k in 0..4 (strided for coalescing);
 *            purely element-wise, so the assignment does not change any result
 *
 * Per element, f32, in this order (IEEE ops, no FMA contraction):
 *   c1, c2 = the host-computed bias corrections of QloraAdamArgs; step_size = (-lr * c2) / c1
 *   g = T(gnorm_scale * g)          (bnb scales g in place, in its own type T)
 *   if !skip_zeros || g != 0:
 *     s1 = s1 * beta1 + (1 - beta1) * g
 *     s2 = s2 * beta2 + (1 - beta2) * (g * g)
 *     p  = T(p + step_size * (s1 / (sqrtf(s2) + eps * c2)))
 *     if weight_decay > 0: p = T(p * (1 - lr * weight_decay))   (decoupled, after the step)
 * Non-finite gradients are not masked here (bnb's 32-bit kernel does not mask them either).
 */
#include "qlora_kernels.h"
#include "common.cuh"

template <typename T>
__device__ void adam32bit_step(T* __restrict__ p, const T* __restrict__ g,
                               float* __restrict__ state1, float* __restrict__ state2,
                               QloraAdamArgs a) {
    const float c1 = a.c1;
    const float c2 = a.c2;
    const float step_size = (-a.lr * c2) / c1;
    const u64 base = (u64)blockIdx.x * (QLORA_OPT32_THREADS * QLORA_OPT32_ITEMS) + threadIdx.x;
    for (unsigned int k = 0; k < QLORA_OPT32_ITEMS; ++k) {
        const u64 i = base + (u64)k * QLORA_OPT32_THREADS;
        if (i >= a.n) return;
        const float grad = to_f32(from_f32<T>(a.gnorm_scale * to_f32(g[i])));
        if (a.skip_zeros && grad == 0.0f) continue;
        float s1 = state1[i];
        float s2 = state2[i];
        s1 = s1 * a.beta1 + (1.0f - a.beta1) * grad;
        s2 = s2 * a.beta2 + (1.0f - a.beta2) * (grad * grad);
        float pf = to_f32(p[i]);
        pf = pf + step_size * (s1 / (sqrtf(s2) + a.eps * c2));
        T updated = from_f32<T>(pf);
        if (a.weight_decay > 0.0f) {
            updated = from_f32<T>(to_f32(updated) * (1.0f - a.lr * a.weight_decay));
        }
        p[i] = updated;
        state1[i] = s1;
        state2[i] = s2;
    }
}

#define QLORA_ADAM32(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(QLORA_OPT32_THREADS)                            \
    adam32bit_step_##SUFFIX(T* p, const T* g, float* state1, float* state2, QloraAdamArgs a) {  \
        adam32bit_step<T>(p, g, state1, state2, a);                                              \
    }
QLORA_ADAM32(f32, float)
QLORA_ADAM32(f16, f16_t)
QLORA_ADAM32(bf16, bf16_t)
