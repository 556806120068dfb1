// Max pooling, NHWC, for CuPy's RawModule (NVRTC, --std=c++14).
//
//   x: (N, H, W, C) -> y, argmax: (N, Ho, Wo, C)
//   window (oy, ox) covers rows oy*sh - top + a and columns ox*sw - left + b, 0 <= a < ph,
//   0 <= b < pw (sizes and padding from kernels/shapes.py). Padded cells are never read, so
//   they never win: y is the maximum of the window's real cells and argmax = a*pw + b of the
//   FIRST real cell (row-major window order) that holds it. A NaN wins over numbers (the
//   maximum propagates NaN, as np.maximum does).
//
// Backward as a GATHER: one thread per input element (n, r, s, c) visits, in a fixed order
// (oy, then ox), the windows that contain it, oy in [ceil((r + top - ph + 1) / sh),
// floor((r + top) / sh)], and adds dy[n, oy, ox, c] where that window's argmax points at it:
//   dx[n, r, s, c] = sum_{(oy, ox) containing (r, s)} dy[n, oy, ox, c]
//                    * [argmax[n, oy, ox, c] == (r + top - oy*sh) * pw + (s + left - ox*sw)]
// Deterministic, no atomics.
//
// Kernels (T: float -> f32, double -> f64; argmax type: unsigned char -> u8, int -> i32):
//   max_pool2d_forward_<T>_<I>  (x, y, argmax, N, H, W, C, Ho, Wo, ph, pw, sh, sw, top, left)
//   max_pool2d_backward_<T>_<I> (dy, argmax, dx, N, H, W, C, Ho, Wo, ph, pw, sh, sw, top, left)
// Integer arguments are long long; the index arithmetic runs in int when input and output hold
// at most 2^30 elements (minicnn_small_index), else in long long.
// Mirrors kernels/pooling.py: max_pool2d_forward, max_pool2d_backward.

__device__ inline bool minicnn_small_index(long long size) { return size <= (1LL << 30); }

template <typename T, typename J, typename I>
__device__ void max_pool2d_forward_impl(const T* __restrict__ x, T* __restrict__ y,
                                        J* __restrict__ argmax, I N, I H, I W, I C, I Ho, I Wo,
                                        I ph, I pw, I sh, I sw, I top, I left)
{
    const I total = N * Ho * Wo * C;
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (I)blockDim.x * gridDim.x) {
        const I c = idx % C;
        I t = idx / C;
        const I ox = t % Wo;
        t /= Wo;
        const I oy = t % Ho;
        const I n = t / Ho;
        T best = T(0);
        I best_k = 0;
        bool found = false;
        for (I a = 0; a < ph; ++a) {
            const I r = oy * sh - top + a;
            if (r < 0 || r >= H) continue;
            for (I b = 0; b < pw; ++b) {
                const I s = ox * sw - left + b;
                if (s < 0 || s >= W) continue;
                const T v = x[((n * H + r) * W + s) * C + c];
                // strictly greater keeps the first maximum; v != v is a NaN, which wins once
                if (!found || v > best || (v != v && best == best)) {
                    best = v;
                    best_k = a * pw + b;
                    found = true;
                }
            }
        }
        y[idx] = best;                 // every window holds a real cell (padding < pool size)
        argmax[idx] = (J)best_k;
    }
}

template <typename T, typename J, typename I>
__device__ void max_pool2d_backward_impl(const T* __restrict__ dy, const J* __restrict__ argmax,
                                         T* __restrict__ dx,
                                         I N, I H, I W, I C,
                                         I Ho, I Wo, I ph, I pw,
                                         I sh, I sw, I top, I left)
{
    const I total = N * H * W * C;
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (I)blockDim.x * gridDim.x) {
        const I c = idx % C;
        I t = idx / C;
        const I s = t % W;
        t /= W;
        const I r = t % H;
        const I n = t / H;
        const I pr = r + top;              // row in the padded image (>= 0)
        const I pc = s + left;
        // windows oy with oy*sh <= pr <= oy*sh + ph - 1
        I oy_lo = pr - ph + 1 > 0 ? (pr - ph + 1 + sh - 1) / sh : 0;
        I oy_hi = pr / sh;
        if (oy_hi > Ho - 1) oy_hi = Ho - 1;
        I ox_lo = pc - pw + 1 > 0 ? (pc - pw + 1 + sw - 1) / sw : 0;
        I ox_hi = pc / sw;
        if (ox_hi > Wo - 1) ox_hi = Wo - 1;
        T sum = T(0);
        for (I oy = oy_lo; oy <= oy_hi; ++oy) {
            const I a = pr - oy * sh;
            for (I ox = ox_lo; ox <= ox_hi; ++ox) {
                const I b = pc - ox * sw;
                const I o = ((n * Ho + oy) * Wo + ox) * C + c;
                if ((I)argmax[o] == a * pw + b) sum += dy[o];
            }
        }
        dx[idx] = sum;
    }
}

#define MINICNN_POOL_KERNELS(T, TS, I, IS)                                                      \
extern "C" __global__ void max_pool2d_forward_##TS##_##IS(                                      \
    const T* x, T* y, I* argmax, long long N, long long H, long long W, long long C,            \
    long long Ho, long long Wo, long long ph, long long pw, long long sh, long long sw,         \
    long long top, long long left)                                                              \
{                                                                                               \
    if (minicnn_small_index(N * H * W * C) && minicnn_small_index(N * Ho * Wo * C))            \
        max_pool2d_forward_impl<T, I, int>(x, y, argmax, (int)N, (int)H, (int)W, (int)C,       \
            (int)Ho, (int)Wo, (int)ph, (int)pw, (int)sh, (int)sw, (int)top, (int)left);         \
    else                                                                                        \
        max_pool2d_forward_impl<T, I, long long>(x, y, argmax, N, H, W, C, Ho, Wo, ph, pw, sh,  \
                                                 sw, top, left);                                \
}                                                                                               \
extern "C" __global__ void max_pool2d_backward_##TS##_##IS(                                     \
    const T* dy, const I* argmax, T* dx, long long N, long long H, long long W, long long C,    \
    long long Ho, long long Wo, long long ph, long long pw, long long sh, long long sw,         \
    long long top, long long left)                                                              \
{                                                                                               \
    if (minicnn_small_index(N * H * W * C) && minicnn_small_index(N * Ho * Wo * C))            \
        max_pool2d_backward_impl<T, I, int>(dy, argmax, dx, (int)N, (int)H, (int)W, (int)C,    \
            (int)Ho, (int)Wo, (int)ph, (int)pw, (int)sh, (int)sw, (int)top, (int)left);         \
    else                                                                                        \
        max_pool2d_backward_impl<T, I, long long>(dy, argmax, dx, N, H, W, C, Ho, Wo, ph, pw,   \
                                                  sh, sw, top, left);                           \
}

MINICNN_POOL_KERNELS(float, f32, unsigned char, u8)
MINICNN_POOL_KERNELS(float, f32, int, i32)
MINICNN_POOL_KERNELS(double, f64, unsigned char, u8)
MINICNN_POOL_KERNELS(double, f64, int, i32)
