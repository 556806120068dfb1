// Batch normalisation over the rows of an (M, C) matrix (x: (N, H, W, C) with M = N*H*W),
// for CuPy's RawModule (NVRTC, --std=c++14).
//
// Statistics (training):  mean_c = (1/M) sum_m x[m, c],  var_c = (1/M) sum_m (x[m, c] - mean_c)^2
//   Summed as "shifted data" in double: d = x - K_c with K_c = x[0, c] (the first row), so
//   mean = K + S1/M and var = S2/M - (S1/M)^2 with S1 = sum d, S2 = sum d^2; the shift keeps the
//   subtraction from cancelling when |mean| >> std.
// Backward sums:  sum_dy_c = sum_m dy[m, c],  sum_dy_xhat_c = sum_m dy[m, c] * x_hat[m, c].
//
// Both reductions run in two stages with a FIXED order (deterministic, no atomics):
//   stage 1  bn_partial_sums: block (32, 8) = 32 channels x 8 row lanes; grid (ceil(C/32), G);
//            block (bx, g) sums rows [g*R, min(M, (g+1)*R)) of its 32 channels (lane l takes
//            rows l, l+8, ...; then a shared-memory tree over the 8 lanes) into part[g, c];
//   stage 2  bn_finalize_*: one thread per channel adds part[0..G-1, c] in order.
// Elementwise (what the forward keeps for the backward: "saved", by save_mode):
//   bn_normalize:    c = x - mean,  y = gamma * inv_std * c + beta;  saved = nothing (0),
//                    x_hat = c * inv_std (1) or c itself (2, kernels.normalization's x_centered)
//   bn_backward_dx:  x_hat = saved (or saved * inv_std when saved_is_centered),
//                    dx = gamma * inv_std / M * (M * dy - sum_dy - x_hat * sum_dy_xhat)
// gamma / beta / scale2 are read only when has_gamma / has_beta / has_scale2 is 1 (CuPy turns a
// None argument into a bad pointer, so the wrappers pass some valid array and a 0 flag instead).
//
// Kernels (T: float -> f32, double -> f64):
//   bn_partial_sums_<T>    (a, b, M, C, rows_per_chunk, mode, part1, part2)
//        mode 0: part1 = sum (a - a[0, c]),  part2 = sum (a - a[0, c])^2     (b unused)
//        mode 1: part1 = sum a,              part2 = sum a * b
//   bn_finalize_stats_<T>  (part1, part2, G, C, M, x, epsilon, mean, var, inv_std)
//   bn_finalize_sums_<T>   (part1, part2, G, C, scale2, has_scale2, out1, out2)
//        out1 = sum_g part1,  out2 = sum_g part2 (* scale2[c])
//   bn_normalize_<T>       (x, mean, inv_std, gamma, beta, has_gamma, has_beta, total, C, y,
//                           saved, save_mode)
//   bn_backward_dx_<T>     (dy, saved, saved_is_centered, gamma, has_gamma, inv_std, sum_dy,
//                           sum_dy_xhat, total, C, M, dx)
// Mirrors kernels/normalization.py: batch_norm_forward_training, batch_norm_backward,
// batch_norm_forward_inference.

// Integer arguments are long long; the index arithmetic of the big kernels runs in int when the
// arrays hold at most 2^30 elements (minicnn_small_index), else in long long.
__device__ inline bool minicnn_small_index(long long size) { return size <= (1LL << 30); }

#define BN_LANES_X 32
#define BN_LANES_Y 8

template <typename T, typename I>
__device__ void bn_partial_sums_impl(const T* __restrict__ a, const T* __restrict__ b,
                                     I M, I C, I rows_per_chunk, int mode,
                                     double* __restrict__ part1, double* __restrict__ part2)
{
    __shared__ double s1[BN_LANES_Y][BN_LANES_X];
    __shared__ double s2[BN_LANES_Y][BN_LANES_X];
    const I c = (I)blockIdx.x * BN_LANES_X + threadIdx.x;
    const I g = blockIdx.y;
    const I start = g * rows_per_chunk;
    I stop = start + rows_per_chunk;
    if (stop > M) stop = M;
    double acc1 = 0.0, acc2 = 0.0;
    if (c < C) {
        const double shift = mode == 0 ? (double)a[c] : 0.0;
        for (I m = start + threadIdx.y; m < stop; m += BN_LANES_Y) {
            const double u = (double)a[m * C + c] - shift;
            acc1 += u;
            acc2 += mode == 0 ? u * u : u * (double)b[m * C + c];
        }
    }
    s1[threadIdx.y][threadIdx.x] = acc1;
    s2[threadIdx.y][threadIdx.x] = acc2;
    __syncthreads();
    for (int half = BN_LANES_Y / 2; half > 0; half /= 2) {    // fixed tree: 8 -> 4 -> 2 -> 1
        if ((int)threadIdx.y < half) {
            s1[threadIdx.y][threadIdx.x] += s1[threadIdx.y + half][threadIdx.x];
            s2[threadIdx.y][threadIdx.x] += s2[threadIdx.y + half][threadIdx.x];
        }
        __syncthreads();
    }
    if (threadIdx.y == 0 && c < C) {
        part1[g * C + c] = s1[0][threadIdx.x];
        part2[g * C + c] = s2[0][threadIdx.x];
    }
}

template <typename T>
__device__ void bn_finalize_stats_impl(const double* __restrict__ part1,
                                       const double* __restrict__ part2, long long G, long long C,
                                       long long M, const T* __restrict__ x, double epsilon,
                                       T* __restrict__ mean, T* __restrict__ var,
                                       T* __restrict__ inv_std)
{
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < C;
         c += (long long)blockDim.x * gridDim.x) {
        double s1 = 0.0, s2 = 0.0;
        for (long long g = 0; g < G; ++g) {
            s1 += part1[g * C + c];
            s2 += part2[g * C + c];
        }
        const double d_mean = s1 / (double)M;               // mean of x - x[0, c]
        double v = s2 / (double)M - d_mean * d_mean;
        if (v < 0.0) v = 0.0;                                // rounding can go below zero
        mean[c] = (T)((double)x[c] + d_mean);
        var[c] = (T)v;
        inv_std[c] = (T)(1.0 / sqrt(v + epsilon));
    }
}

template <typename T>
__device__ void bn_finalize_sums_impl(const double* __restrict__ part1,
                                      const double* __restrict__ part2, long long G, long long C,
                                      const T* __restrict__ scale2, int has_scale2,
                                      T* __restrict__ out1, T* __restrict__ out2)
{
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < C;
         c += (long long)blockDim.x * gridDim.x) {
        double s1 = 0.0, s2 = 0.0;
        for (long long g = 0; g < G; ++g) {
            s1 += part1[g * C + c];
            s2 += part2[g * C + c];
        }
        out1[c] = (T)s1;
        out2[c] = (T)(has_scale2 ? s2 * (double)scale2[c] : s2);
    }
}

template <typename T, typename I>
__device__ void bn_normalize_impl(const T* __restrict__ x, const T* __restrict__ mean,
                                  const T* __restrict__ inv_std, const T* __restrict__ gamma,
                                  const T* __restrict__ beta, int has_gamma, int has_beta,
                                  I total, I C, T* __restrict__ y,
                                  T* __restrict__ saved, int save_mode)
{
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (I)blockDim.x * gridDim.x) {
        const I c = idx % C;
        const T centered = x[idx] - mean[c];
        const T h = centered * inv_std[c];
        if (save_mode == 1) saved[idx] = h;
        if (save_mode == 2) saved[idx] = centered;
        T out = has_gamma ? gamma[c] * h : h;
        if (has_beta) out += beta[c];
        y[idx] = out;
    }
}

template <typename T, typename I>
__device__ void bn_backward_dx_impl(const T* __restrict__ dy, const T* __restrict__ saved,
                                    int saved_is_centered, const T* __restrict__ gamma,
                                    int has_gamma,
                                    const T* __restrict__ inv_std, const T* __restrict__ sum_dy,
                                    const T* __restrict__ sum_dy_xhat, I total,
                                    I C, I M, T* __restrict__ dx)
{
    const T m = (T)M;
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (I)blockDim.x * gridDim.x) {
        const I c = idx % C;
        const T x_hat = saved_is_centered ? saved[idx] * inv_std[c] : saved[idx];
        const T k = (has_gamma ? gamma[c] : T(1)) * inv_std[c] / m;
        dx[idx] = k * (m * dy[idx] - sum_dy[c] - x_hat * sum_dy_xhat[c]);
    }
}

#define MINICNN_BN_KERNELS(T, SUFFIX)                                                           \
extern "C" __global__ void bn_partial_sums_##SUFFIX(                                            \
    const T* a, const T* b, long long M, long long C, long long rows_per_chunk, int mode,       \
    double* part1, double* part2)                                                               \
{                                                                                               \
    if (minicnn_small_index(M * C))                                                             \
        bn_partial_sums_impl<T, int>(a, b, (int)M, (int)C, (int)rows_per_chunk, mode, part1,    \
                                     part2);                                                    \
    else                                                                                        \
        bn_partial_sums_impl<T, long long>(a, b, M, C, rows_per_chunk, mode, part1, part2);     \
}                                                                                               \
extern "C" __global__ void bn_finalize_stats_##SUFFIX(                                          \
    const double* part1, const double* part2, long long G, long long C, long long M,            \
    const T* x, double epsilon, T* mean, T* var, T* inv_std)                                    \
{                                                                                               \
    bn_finalize_stats_impl<T>(part1, part2, G, C, M, x, epsilon, mean, var, inv_std);           \
}                                                                                               \
extern "C" __global__ void bn_finalize_sums_##SUFFIX(                                           \
    const double* part1, const double* part2, long long G, long long C, const T* scale2,        \
    int has_scale2, T* out1, T* out2)                                                           \
{                                                                                               \
    bn_finalize_sums_impl<T>(part1, part2, G, C, scale2, has_scale2, out1, out2);               \
}                                                                                               \
extern "C" __global__ void bn_normalize_##SUFFIX(                                               \
    const T* x, const T* mean, const T* inv_std, const T* gamma, const T* beta,                 \
    int has_gamma, int has_beta, long long total, long long C, T* y, T* saved,                  \
    int save_mode)                                                                              \
{                                                                                               \
    if (minicnn_small_index(total))                                                             \
        bn_normalize_impl<T, int>(x, mean, inv_std, gamma, beta, has_gamma, has_beta,          \
                                  (int)total, (int)C, y, saved, save_mode);                     \
    else                                                                                        \
        bn_normalize_impl<T, long long>(x, mean, inv_std, gamma, beta, has_gamma, has_beta,    \
                                        total, C, y, saved, save_mode);                         \
}                                                                                               \
extern "C" __global__ void bn_backward_dx_##SUFFIX(                                             \
    const T* dy, const T* saved, int saved_is_centered, const T* gamma, int has_gamma,          \
    const T* inv_std, const T* sum_dy, const T* sum_dy_xhat, long long total, long long C,      \
    long long M, T* dx)                                                                         \
{                                                                                               \
    if (minicnn_small_index(total))                                                             \
        bn_backward_dx_impl<T, int>(dy, saved, saved_is_centered, gamma, has_gamma, inv_std,    \
                                    sum_dy, sum_dy_xhat, (int)total, (int)C, (int)M, dx);       \
    else                                                                                        \
        bn_backward_dx_impl<T, long long>(dy, saved, saved_is_centered, gamma, has_gamma,       \
                                          inv_std, sum_dy, sum_dy_xhat, total, C, M, dx);       \
}

MINICNN_BN_KERNELS(float, f32)
MINICNN_BN_KERNELS(double, f64)
