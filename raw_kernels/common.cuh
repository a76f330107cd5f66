// common.cuh: device helpers shared by the CuPy RawKernel sources of unisparse-ref.
//
// The loader (unisparse_ref/cupy_backend/_loader.py) inlines this file where a .cu says
// #include "common.cuh", so NVRTC needs no include path for it. Every .cu includes it.
//
// Element types: every kernel that reads q, k or v is a template over T in
// {__half, __nv_bfloat16, float}; bf16 travels from Python as the raw 16-bit pattern
// (a uint16 CuPy array) and is read here as __nv_bfloat16. Arithmetic is float32.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// NVRTC has no <cmath>/<math.h> by default: +infinity as a bit pattern.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

namespace us {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_double(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double to_double(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Two floats rounded to T and packed into one 32-bit register (low half = a): the layout of
// the tensor-core operands (an mma.sync A fragment, a wgmma A operand from registers) and of
// a 2-element store of the output.
template <typename T> __device__ __forceinline__ unsigned pack2(float a, float b);
template <> __device__ __forceinline__ unsigned pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<unsigned*>(&h);
}

// ceil(a / b) for non-negative ints.
__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// SPEC 1: query row t sits at absolute position p(t) = t + (Nk - Nq) (bottom-right alignment).
__device__ __forceinline__ long long qpos(long long t, int nq, int nk) { return t + (nk - nq); }

}  // namespace us

// Pooling's 16-byte loads (pooling.cu us_pool_seq, varlen.cu us_pool_varlen): V = 16 / sizeof(T)
// consecutive elements of x as one load, read back as floats.
struct __align__(16) us_pool_v16 {
    unsigned w[4];
};

// Element v of a 16-byte load as float (v a compile-time index after unrolling: no local memory).
__device__ __forceinline__ float us_pool_elem(const us_pool_v16& a, int v, float*) {
    return __uint_as_float(a.w[v]);
}
__device__ __forceinline__ float us_pool_elem(const us_pool_v16& a, int v, __nv_bfloat16*) {
    return __uint_as_float(((a.w[v >> 1] >> (16 * (v & 1))) & 0xffffu) << 16);  // bf16 = the top half of a float
}
__device__ __forceinline__ float us_pool_elem(const us_pool_v16& a, int v, __half*) {
    const unsigned short bits = (unsigned short)((a.w[v >> 1] >> (16 * (v & 1))) & 0xffffu);
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    return __half2float(__ushort_as_half(bits));
#else
    return __half2float(__half{bits});  // the host emulation's __half
#endif
}

// Whether a pooling thread takes V consecutive d with 16-byte loads: D a multiple of V and x
// 16-byte aligned (the backend's launch configurations evaluate the same test for the grid).
template <typename T> __device__ __forceinline__ bool us_pool_vector(const T* x, int D) {
    return D % (int)(16 / sizeof(T)) == 0 && ((unsigned long long)x & 15ull) == 0;
}

// One head's share of a composite token (pooling.cu us_pool_seq, varlen.cu us_pool_varlen):
// acc[v] += (sum over tokens t = t0 .. t1-1, ascending, of col[t * stride + v]) * inv_n for the
// per = V (16-byte loads, four in flight) or per = 1 consecutive d of this thread.
template <typename T>
__device__ __forceinline__ void us_pool_head(const T* col, long long stride, int t0, int t1, int per, float inv_n,
                                             float (&acc)[16 / sizeof(T)]) {
    constexpr int V = (int)(16 / sizeof(T));
    float s[V];
#pragma unroll
    for (int v = 0; v < V; ++v) s[v] = 0.0f;
    if (per == V) {
#pragma unroll 4
        for (int t = t0; t < t1; ++t) {
            const us_pool_v16 ld = *reinterpret_cast<const us_pool_v16*>(col + (long long)t * stride);
#pragma unroll
            for (int v = 0; v < V; ++v) s[v] += us_pool_elem(ld, v, (T*)nullptr);
        }
    } else {
        for (int t = t0; t < t1; ++t) s[0] += us::to_float(col[(long long)t * stride]);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] += s[v] * inv_n;  // the sequence mean of this head
}

// The head mean that finishes a composite token (both pooling kernels): o[v] = acc[v] / c_h for
// the per = V or per = 1 consecutive d of this thread.
template <typename T>
__device__ __forceinline__ void us_pool_store(float* o, const float (&acc)[16 / sizeof(T)], int per, int c_h) {
    constexpr int V = (int)(16 / sizeof(T));
    if (per == V) {
#pragma unroll
        for (int v = 0; v < V; ++v) o[v] = acc[v] / (float)c_h;  // head mean
    } else {
        o[0] = acc[0] / (float)c_h;
    }
}
