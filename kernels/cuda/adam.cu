// Adam over every weight in ONE launch, for CuPy's RawModule (NVRTC, --std=c++14).
//
// The weights are many separate arrays (w_k, g_k, m_k, v_k for k = 0 .. K-1). They are seen as
// one flat sequence of total = sum_k size_k elements: element idx belongs to the weight k with
// offsets[k] <= idx < offsets[k + 1] (offsets: the K + 1 running sums of the sizes, found by
// binary search) at position i = idx - offsets[k] of its arrays. Each thread updates its
// elements in place, exactly Keras' Adam step (kernels/cuda/adam.py states it in full):
//
//   m <- m + (g - m) * (1 - beta_1)
//   v <- v + (g*g - v) * (1 - beta_2)
//   w <- w - (m / (sqrt(v) + epsilon)) * alpha,    alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)
//
// Kernels (T: float -> f32, double -> f64):
//   adam_multi_<T> (w, g, m, v, offsets, K, total, alpha, one_minus_beta_1, one_minus_beta_2,
//                   epsilon)
//   w, g, m, v: K device addresses each (unsigned long long), one per weight, of T arrays;
//   offsets: K + 1 long long. Elementwise, no reductions: deterministic.
// Mirrors kernels/cuda/adam.py: adam_update_reference (NumPy), and minicnn.optimizers.Adam.

__device__ inline float minicnn_sqrt(float v) { return sqrtf(v); }
__device__ inline double minicnn_sqrt(double v) { return sqrt(v); }

// The weight k holding flat element idx: the largest k with offsets[k] <= idx (empty weights,
// whose offsets repeat, are passed over).
__device__ inline int minicnn_owner(const long long* __restrict__ offsets, int K, long long idx)
{
    int lo = 0, hi = K - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= idx) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

template <typename T>
__device__ void adam_multi_impl(const unsigned long long* __restrict__ w_ptrs,
                                const unsigned long long* __restrict__ g_ptrs,
                                const unsigned long long* __restrict__ m_ptrs,
                                const unsigned long long* __restrict__ v_ptrs,
                                const long long* __restrict__ offsets, int K, long long total,
                                T alpha, T one_minus_beta_1, T one_minus_beta_2, T epsilon)
{
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const int k = minicnn_owner(offsets, K, idx);
        const long long i = idx - offsets[k];
        T* w = reinterpret_cast<T*>(w_ptrs[k]);
        const T* g = reinterpret_cast<const T*>(g_ptrs[k]);
        T* m = reinterpret_cast<T*>(m_ptrs[k]);
        T* v = reinterpret_cast<T*>(v_ptrs[k]);
        const T gi = g[i];
        T mi = m[i];
        T vi = v[i];
        mi += (gi - mi) * one_minus_beta_1;
        vi += (gi * gi - vi) * one_minus_beta_2;
        m[i] = mi;
        v[i] = vi;
        w[i] -= (mi / (minicnn_sqrt(vi) + epsilon)) * alpha;
    }
}

#define MINICNN_ADAM_KERNEL(T, SUFFIX)                                                          \
extern "C" __global__ void adam_multi_##SUFFIX(                                                 \
    const unsigned long long* w, const unsigned long long* g, const unsigned long long* m,      \
    const unsigned long long* v, const long long* offsets, int K, long long total, T alpha,     \
    T one_minus_beta_1, T one_minus_beta_2, T epsilon)                                          \
{                                                                                               \
    adam_multi_impl<T>(w, g, m, v, offsets, K, total, alpha, one_minus_beta_1,                  \
                       one_minus_beta_2, epsilon);                                              \
}

MINICNN_ADAM_KERNEL(float, f32)
MINICNN_ADAM_KERNEL(double, f64)
