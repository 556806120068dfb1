// im2col and col2im for 2D convolution, NHWC input, for CuPy's RawModule (NVRTC, --std=c++14).
//
//   x:    (N, H, W, C)                  the (unpadded) input
//   cols: (N, Ho, Wo, kh, kw, C)
//         cols[n, oy, ox, i, j, c] = xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]
//
// with xpad the input zero-padded by (top, left) rows/columns before and whatever is needed after
// (sizes and padding come from kernels/shapes.py; this file never derives them).
//
// im2col: one thread per element of cols (a grid-stride loop); reads outside the image give 0.
// col2im: the adjoint, dx[n, y, x, c] = sum over the taps (i, j) and windows (oy, ox) that read
//         input pixel (y, x) of cols[n, oy, ox, i, j, c]. Written as a GATHER: one thread per
//         input element sums its contributions in a fixed order (i, then j), so the result is
//         deterministic and needs no atomics. Tap (i, j) reads (y, x) from window
//         oy = (y + top - i*dh) / sh when that is a non-negative multiple of sh below Ho.
//
// Kernels (T = float -> _f32, double -> _f64):
//   im2col_f32 / im2col_f64 (x, cols, N, H, W, C, Ho, Wo, kh, kw, sh, sw, dh, dw, top, left)
//   col2im_f32 / col2im_f64 (cols, dx, N, H, W, C, Ho, Wo, kh, kw, sh, sw, dh, dw, top, left)
// Integer arguments are 64-bit (long long); the index arithmetic runs in 32-bit int when both
// arrays hold at most 2^30 elements (see minicnn_small_index), which is several times faster
// than 64-bit division, else in long long. Mirrors kernels/conv2d.py: im2col, col2im.

__device__ inline bool minicnn_small_index(long long size) { return size <= (1LL << 30); }

template <typename T, typename I>
__device__ void im2col_impl(const T* __restrict__ x, T* __restrict__ cols,
                            I N, I H, I W, I C, I Ho, I Wo, I kh, I kw, I sh, I sw, I dh, I dw,
                            I top, I left)
{
    const I inner = kh * kw * C;             // values per output pixel (one cols row)
    const I total = N * Ho * Wo * inner;
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (I)blockDim.x * gridDim.x) {
        const I row = idx / inner;           // output pixel (n, oy, ox)
        I rem = idx - row * inner;           // (i, j, c) inside the window
        const I c = rem % C;
        rem /= C;
        const I j = rem % kw;
        const I i = rem / kw;
        const I ox = row % Wo;
        const I t = row / Wo;
        const I oy = t % Ho;
        const I n = t / Ho;
        const I iy = oy * sh + i * dh - top;  // input row read by tap i of window oy
        const I ix = ox * sw + j * dw - left;
        T value = T(0);
        if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
            value = x[((n * H + iy) * W + ix) * C + c];
        }
        cols[idx] = value;
    }
}

template <typename T, typename I>
__device__ void col2im_impl(const T* __restrict__ cols, T* __restrict__ dx,
                            I N, I H, I W, I C, I Ho, I Wo, I kh, I kw, I sh, I sw, I dh, I dw,
                            I top, I left)
{
    const I total = N * H * W * C;
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (I)blockDim.x * gridDim.x) {
        const I c = idx % C;
        I t = idx / C;
        const I x = t % W;
        t /= W;
        const I y = t % H;
        const I n = t / H;
        T sum = T(0);
        for (I i = 0; i < kh; ++i) {
            const I py = y + top - i * dh;    // = oy * sh for the window that reads it
            if (py < 0 || py % sh != 0) continue;
            const I oy = py / sh;
            if (oy >= Ho) continue;
            for (I j = 0; j < kw; ++j) {
                const I px = x + left - j * dw;
                if (px < 0 || px % sw != 0) continue;
                const I ox = px / sw;
                if (ox >= Wo) continue;
                sum += cols[((((n * Ho + oy) * Wo + ox) * kh + i) * kw + j) * C + c];
            }
        }
        dx[idx] = sum;
    }
}

#define MINICNN_CONV_KERNELS(T, SUFFIX)                                                         \
extern "C" __global__ void im2col_##SUFFIX(                                                     \
    const T* x, T* cols, long long N, long long H, long long W, long long C,                    \
    long long Ho, long long Wo, long long kh, long long kw, long long sh, long long sw,         \
    long long dh, long long dw, long long top, long long left)                                  \
{                                                                                               \
    if (minicnn_small_index(N * Ho * Wo * kh * kw * C) && minicnn_small_index(N * H * W * C))  \
        im2col_impl<T, int>(x, cols, (int)N, (int)H, (int)W, (int)C, (int)Ho, (int)Wo, (int)kh, \
                            (int)kw, (int)sh, (int)sw, (int)dh, (int)dw, (int)top, (int)left);  \
    else                                                                                        \
        im2col_impl<T, long long>(x, cols, N, H, W, C, Ho, Wo, kh, kw, sh, sw, dh, dw, top,     \
                                  left);                                                        \
}                                                                                               \
extern "C" __global__ void col2im_##SUFFIX(                                                     \
    const T* cols, T* dx, long long N, long long H, long long W, long long C,                   \
    long long Ho, long long Wo, long long kh, long long kw, long long sh, long long sw,         \
    long long dh, long long dw, long long top, long long left)                                  \
{                                                                                               \
    if (minicnn_small_index(N * Ho * Wo * kh * kw * C) && minicnn_small_index(N * H * W * C))  \
        col2im_impl<T, int>(cols, dx, (int)N, (int)H, (int)W, (int)C, (int)Ho, (int)Wo, (int)kh,\
                            (int)kw, (int)sh, (int)sw, (int)dh, (int)dw, (int)top, (int)left);  \
    else                                                                                        \
        col2im_impl<T, long long>(cols, dx, N, H, W, C, Ho, Wo, kh, kw, sh, sw, dh, dw, top,    \
                                  left);                                                        \
}

MINICNN_CONV_KERNELS(float, f32)
MINICNN_CONV_KERNELS(double, f64)
