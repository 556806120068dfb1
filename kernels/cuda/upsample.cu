// Up-sampling of NHWC images by integer factors (sh, sw), for CuPy's RawModule (NVRTC,
// --std=c++14). x: (N, H, W, C) -> y: (N, H*sh, W*sw, C).
//
// nearest:   y[n, o, q, c] = x[n, o / sh, q / sw, c]
// bilinear:  Keras 3 / TF resize with half-pixel centres. Output row o samples the input at
//            r = (o + 0.5) / sh - 0.5; r0 = floor(r); rows lo = clamp(r0), hi = clamp(r0 + 1)
//            (clamped to [0, H-1]) and t = r - r0; the same along columns (s0, s1, u). Columns
//            first, as TF:
//              top    = x[lo, s0] + (x[lo, s1] - x[lo, s0]) * u
//              bottom = x[hi, s0] + (x[hi, s1] - x[hi, s0]) * u
//              y      = top + (bottom - top) * t
// Backward (the adjoint) as a GATHER: one thread per input element (n, i, j, c) sums over the
// output rows o in [(i-1)*sh, (i+2)*sh) and columns q in [(j-1)*sw, (j+2)*sw) (clipped to the
// image; no other output reads input row i / column j) in a fixed order:
//   dx[n, i, j, c] = sum_{o, q} wr(o, i) * wc(q, j) * dy[n, o, q, c]
//   wr(o, i) = [lo(o) == i] (1 - t(o)) + [hi(o) == i] t(o)      (both terms when lo == hi)
// and for nearest, the sum of dy over the sh x sw block of (i, j). Deterministic, no atomics.
//
// Kernels (T: float -> f32, double -> f64; bilinear = 0 nearest, 1 bilinear):
//   upsample2d_forward_<T>  (x, y, N, H, W, C, sh, sw, bilinear)
//   upsample2d_backward_<T> (dy, dx, N, H, W, C, sh, sw, bilinear)      (H, W: the SMALL image)
// Integer arguments are long long; the index arithmetic runs in int when the large image holds
// at most 2^30 elements (minicnn_small_index), else in long long.
// Mirrors kernels/pooling.py: upsample2d_forward, upsample2d_backward.

__device__ inline bool minicnn_small_index(long long size) { return size <= (1LL << 30); }

template <typename I>
struct LerpSource {
    I lo, hi;           // the two input indices, clamped to [0, n-1]
    double t;           // weight of hi: value = v[lo] + (v[hi] - v[lo]) * t
};

template <typename I>
__device__ inline LerpSource<I> lerp_source(I o, I s, I n)
{
    const double r = ((double)o + 0.5) / (double)s - 0.5;
    const double r0 = floor(r);
    I lo = (I)r0, hi = lo + 1;
    LerpSource<I> src;
    src.t = r - r0;
    src.lo = lo < 0 ? 0 : (lo > n - 1 ? n - 1 : lo);
    src.hi = hi < 0 ? 0 : (hi > n - 1 ? n - 1 : hi);
    return src;
}

// weight with which output index o (an axis scaled by s from n) reads input index i
template <typename I>
__device__ inline double lerp_weight(I o, I s, I n, I i)
{
    const LerpSource<I> src = lerp_source(o, s, n);
    double w = 0.0;
    if (src.lo == i) w += 1.0 - src.t;
    if (src.hi == i) w += src.t;
    return w;
}

template <typename T, typename I>
__device__ void upsample2d_forward_impl(const T* __restrict__ x, T* __restrict__ y,
                                        I N, I H, I W, I C,
                                        I sh, I sw, int bilinear)
{
    const I Ho = H * sh, Wo = W * sw;
    const I total = N * Ho * Wo * C;
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (I)blockDim.x * gridDim.x) {
        const I c = idx % C;
        I t = idx / C;
        const I q = t % Wo;
        t /= Wo;
        const I o = t % Ho;
        const I n = t / Ho;
        const T* image = x + n * H * W * C + c;
        if (!bilinear) {
            y[idx] = image[((o / sh) * W + q / sw) * C];
            continue;
        }
        const LerpSource<I> rows = lerp_source(o, sh, H);
        const LerpSource<I> cols = lerp_source(q, sw, W);
        const T tr = (T)rows.t, tc = (T)cols.t;
        const T a = image[(rows.lo * W + cols.lo) * C], b = image[(rows.lo * W + cols.hi) * C];
        const T d = image[(rows.hi * W + cols.lo) * C], e = image[(rows.hi * W + cols.hi) * C];
        const T top = a + (b - a) * tc;
        const T bottom = d + (e - d) * tc;
        y[idx] = top + (bottom - top) * tr;
    }
}

template <typename T, typename I>
__device__ void upsample2d_backward_impl(const T* __restrict__ dy, T* __restrict__ dx,
                                         I N, I H, I W, I C,
                                         I sh, I sw, int bilinear)
{
    const I Ho = H * sh, Wo = W * sw;
    const I total = N * H * W * C;
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (I)blockDim.x * gridDim.x) {
        const I c = idx % C;
        I t = idx / C;
        const I j = t % W;
        t /= W;
        const I i = t % H;
        const I n = t / H;
        const T* grad = dy + n * Ho * Wo * C + c;
        T sum = T(0);
        if (!bilinear) {
            for (I o = i * sh; o < (i + 1) * sh; ++o)
                for (I q = j * sw; q < (j + 1) * sw; ++q)
                    sum += grad[(o * Wo + q) * C];
            dx[idx] = sum;
            continue;
        }
        const I o_lo = (i - 1) * sh > 0 ? (i - 1) * sh : 0;
        const I o_hi = (i + 2) * sh < Ho ? (i + 2) * sh : Ho;
        const I q_lo = (j - 1) * sw > 0 ? (j - 1) * sw : 0;
        const I q_hi = (j + 2) * sw < Wo ? (j + 2) * sw : Wo;
        for (I o = o_lo; o < o_hi; ++o) {
            const T wr = (T)lerp_weight(o, sh, H, i);
            if (wr == T(0)) continue;
            for (I q = q_lo; q < q_hi; ++q) {
                const T wc = (T)lerp_weight(q, sw, W, j);
                if (wc == T(0)) continue;
                sum += wr * wc * grad[(o * Wo + q) * C];
            }
        }
        dx[idx] = sum;
    }
}

#define MINICNN_UPSAMPLE_KERNELS(T, SUFFIX)                                                     \
extern "C" __global__ void upsample2d_forward_##SUFFIX(                                         \
    const T* x, T* y, long long N, long long H, long long W, long long C, long long sh,         \
    long long sw, int bilinear)                                                                 \
{                                                                                               \
    if (minicnn_small_index(N * H * sh * W * sw * C))                                           \
        upsample2d_forward_impl<T, int>(x, y, (int)N, (int)H, (int)W, (int)C, (int)sh,          \
                                        (int)sw, bilinear);                                     \
    else                                                                                        \
        upsample2d_forward_impl<T, long long>(x, y, N, H, W, C, sh, sw, bilinear);              \
}                                                                                               \
extern "C" __global__ void upsample2d_backward_##SUFFIX(                                        \
    const T* dy, T* dx, long long N, long long H, long long W, long long C, long long sh,       \
    long long sw, int bilinear)                                                                 \
{                                                                                               \
    if (minicnn_small_index(N * H * sh * W * sw * C))                                           \
        upsample2d_backward_impl<T, int>(dy, dx, (int)N, (int)H, (int)W, (int)C, (int)sh,       \
                                         (int)sw, bilinear);                                    \
    else                                                                                        \
        upsample2d_backward_impl<T, long long>(dy, dx, N, H, W, C, sh, sw, bilinear);           \
}

MINICNN_UPSAMPLE_KERNELS(float, f32)
MINICNN_UPSAMPLE_KERNELS(double, f64)
