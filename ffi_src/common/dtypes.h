// Element types the kernels understand, and bit-exact scalar conversions usable on host and
// device. The CUDA kernels may use hardware intrinsics in hot loops; these are the definition
// both must agree with (round-to-nearest-even, fp8 saturating).
#pragma once

#include <cstdint>
#include <cstring>

#include "macros.h"

namespace jpa {

enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF8E4M3 = 3, kInvalid = -1 };

JPA_HD int dtype_bytes(DType t) {
  return t == DType::kF32 ? 4 : (t == DType::kF8E4M3 ? 1 : 2);
}

JPA_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

JPA_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

JPA_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

JPA_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                         // round to nearest even
  return uint16_t(u >> 16);
}

JPA_HD float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    // zero or subnormal: man * 2^-24
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

JPA_HD uint16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // nan
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // result is subnormal (or zero): value / 2^-24, rounded to nearest even
    float v = bits_to_float(a) * 16777216.0f;  // exact scaling by 2^24
    uint32_t m = uint32_t(v);
    float rem = v - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return uint16_t(sign | m);  // m == 0x400 correctly becomes the smallest normal
  }
  uint32_t exp = (a >> 23) - 112u;
  uint32_t man = a & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

// float8_e4m3fn: bias 7, no infinities, 0x7f / 0xff are NaN, max finite 448.
JPA_HD float f8e4m3_to_float(uint8_t b) {
  uint32_t sign = uint32_t(b & 0x80u) << 24;
  uint32_t exp = (b >> 3) & 0xfu;
  uint32_t man = b & 0x7u;
  if (exp == 0xf && man == 0x7) return bits_to_float(sign | 0x7fc00000u);
  if (exp == 0) {
    float v = float(man) * 0.001953125f;  // man * 2^-9
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 120u) << 23) | (man << 20));
}

JPA_HD uint8_t float_to_f8e4m3(float f) {
  uint32_t u = float_to_bits(f);
  uint8_t sign = uint8_t((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);  // nan
  if (a >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // >= 448 (and inf): saturate
  if (a < 0x3c800000u) {
    // below the smallest normal 2^-6: subnormal steps of 2^-9
    float v = bits_to_float(a) * 512.0f;
    uint32_t m = uint32_t(v);
    float rem = v - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return uint8_t(sign | m);  // m == 8 becomes the smallest normal
  }
  uint32_t exp = (a >> 23) - 120u;
  uint32_t man = a & 0x7fffffu;
  uint32_t r = (exp << 3) | (man >> 20);
  uint32_t rest = man & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (r & 1u))) ++r;
  if (r > 0x7eu) r = 0x7eu;  // rounding up past 448 saturates
  return uint8_t(sign | r);
}

// Load element `i` of a buffer of dtype `t` as float.
JPA_HD float load_as_float(const void* base, int64_t i, DType t) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(base)[i];
    case DType::kF16: return f16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kF8E4M3: return f8e4m3_to_float(static_cast<const uint8_t*>(base)[i]);
    default: return 0.0f;
  }
}

// Store `x` as element `i` of a buffer of dtype `t` (round to nearest even).
JPA_HD void store_from_float(void* base, int64_t i, DType t, float x) {
  switch (t) {
    case DType::kF32: static_cast<float*>(base)[i] = x; break;
    case DType::kF16: static_cast<uint16_t*>(base)[i] = float_to_f16(x); break;
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = float_to_bf16(x); break;
    case DType::kF8E4M3: static_cast<uint8_t*>(base)[i] = float_to_f8e4m3(x); break;
    default: break;
  }
}

}  // namespace jpa
