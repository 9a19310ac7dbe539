// f16 for the CPU emulation (cuda_shim.h): the compiler's _Float16 (IEEE binary16, round to
// nearest even, as __float2half).
#pragma once
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half(float f) { return {_Float16(f)}; }
