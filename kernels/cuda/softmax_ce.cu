// Fused softmax cross-entropy over the LAST axis with integer labels, for CuPy's RawModule
// (NVRTC, --std=c++14). logits z: (P, C) rows, labels: (P,) int32.
//
//   log p_c = z_c - (max_k z_k) - log(sum_k exp(z_k - max_k z_k))      (log-sum-exp, stable)
//   loss[p] = -w[y] log p_y                w[y] = class_weight[y], or 1 without class weights
//   grad[p, c] = w[y] (p_c - [c == y])     the gradient of loss[p] with respect to z[p, c]
//
// A label of -1 means "ignored" (ignore_class): loss 0 and a zero gradient row (probabilities are
// still written in mode 0). A label outside [-1, C) is a caller's bug: its loss (and gradient row)
// is NaN, so the mistake cannot pass silently.
//
// One thread per row (segmentation has a handful of classes: the three passes over the row stay
// in L1). Kernels (T: float -> f32, double -> f64):
//   softmax_ce_forward_<T>  (z, labels, class_weight, has_weight, P, C, mode, loss, out)
//        mode 0: out = softmax(z)   (what the backward needs; mirrors the NumPy kernel's saved q)
//        mode 1: out = grad         (the fused loss-and-gradient of a training step)
//   softmax_ce_backward_<T> (g, weight, has_weight, labels, q, P, C, dz)
//        dz[p, c] = g[p] * weight[p] * (q[p, c] - [c == labels[p]]),  weight per ROW here
// Mirrors kernels/losses.py: sparse_categorical_crossentropy_forward / _backward (from_logits).

// Integer arguments are long long; the index arithmetic runs in int when logits hold at most
// 2^30 elements (minicnn_small_index), else in long long.
__device__ inline bool minicnn_small_index(long long size) { return size <= (1LL << 30); }

__device__ inline float minicnn_exp(float v) { return expf(v); }
__device__ inline double minicnn_exp(double v) { return exp(v); }
__device__ inline float minicnn_log(float v) { return logf(v); }
__device__ inline double minicnn_log(double v) { return log(v); }
__device__ inline float minicnn_nan(float) { return __int_as_float(0x7fc00000); }
__device__ inline double minicnn_nan(double) { return __longlong_as_double(0x7ff8000000000000LL); }

template <typename T, typename I>
__device__ void softmax_ce_forward_impl(const T* __restrict__ z, const int* __restrict__ labels,
                                        const T* __restrict__ class_weight, int has_weight,
                                        I P, I C, int mode,
                                        T* __restrict__ loss, T* __restrict__ out)
{
    for (I p = (I)blockIdx.x * blockDim.x + threadIdx.x; p < P;
         p += (I)blockDim.x * gridDim.x) {
        const T* row = z + p * C;
        T* out_row = out + p * C;
        const int label = labels[p];
        T top = row[0];
        for (I c = 1; c < C; ++c) top = row[c] > top ? row[c] : top;
        T total = T(0);
        for (I c = 0; c < C; ++c) total += minicnn_exp(row[c] - top);
        const T log_total = minicnn_log(total);
        if (label < -1 || label >= C) {                      // out of range: make it loud
            loss[p] = minicnn_nan(T(0));
            for (I c = 0; c < C; ++c) out_row[c] = minicnn_nan(T(0));
            continue;
        }
        const bool ignored = label == -1;
        const T w = ignored ? T(0) : (has_weight ? class_weight[label] : T(1));
        loss[p] = ignored ? T(0) : w * (log_total - (row[label] - top));
        for (I c = 0; c < C; ++c) {
            const T prob = minicnn_exp(row[c] - top - log_total);
            if (mode == 0) {
                out_row[c] = prob;
            } else {
                out_row[c] = ignored ? T(0) : w * (prob - (c == label ? T(1) : T(0)));
            }
        }
    }
}

template <typename T, typename I>
__device__ void softmax_ce_backward_impl(const T* __restrict__ g, const T* __restrict__ weight,
                                         int has_weight, const int* __restrict__ labels,
                                         const T* __restrict__ q, I P, I C,
                                         T* __restrict__ dz)
{
    const I total = P * C;
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (I)blockDim.x * gridDim.x) {
        const I p = idx / C;
        const I c = idx - p * C;
        const T scale = has_weight ? g[p] * weight[p] : g[p];
        dz[idx] = scale * (q[idx] - ((I)labels[p] == c ? T(1) : T(0)));
    }
}

#define MINICNN_SOFTMAX_CE_KERNELS(T, SUFFIX)                                                   \
extern "C" __global__ void softmax_ce_forward_##SUFFIX(                                         \
    const T* z, const int* labels, const T* class_weight, int has_weight, long long P,          \
    long long C, int mode, T* loss, T* out)                                                     \
{                                                                                               \
    if (minicnn_small_index(P * C))                                                             \
        softmax_ce_forward_impl<T, int>(z, labels, class_weight, has_weight, (int)P, (int)C,   \
                                        mode, loss, out);                                       \
    else                                                                                        \
        softmax_ce_forward_impl<T, long long>(z, labels, class_weight, has_weight, P, C, mode, \
                                              loss, out);                                       \
}                                                                                               \
extern "C" __global__ void softmax_ce_backward_##SUFFIX(                                        \
    const T* g, const T* weight, int has_weight, const int* labels, const T* q, long long P,    \
    long long C, T* dz)                                                                         \
{                                                                                               \
    if (minicnn_small_index(P * C))                                                             \
        softmax_ce_backward_impl<T, int>(g, weight, has_weight, labels, q, (int)P, (int)C, dz); \
    else                                                                                        \
        softmax_ce_backward_impl<T, long long>(g, weight, has_weight, labels, q, P, C, dz);     \
}

MINICNN_SOFTMAX_CE_KERNELS(float, f32)
MINICNN_SOFTMAX_CE_KERNELS(double, f64)
