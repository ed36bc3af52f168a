// mtl_shim.h: a C++20 emulation of the Metal Shading Language subset that MLX custom kernels
// (mx.fast.metal_kernel) use, plus the part of MLX's `utils.h` prelude kernels rely on.
//
// The emulator compiles MLX's generated kernel source with g++ against this header and runs
// each threadgroup's threads as cooperative fibers (see mtl_runtime.cpp). Written for
// qwen2-mlx; it mirrors documented Metal semantics, not Apple's or MLX's code.
//
// Sections: (1) ABI shared with the runtime, (2) address spaces and scalar types, (3) bfloat,
// (4) vectors, (5) math, (6) limits and type traits, (7) atomics, (8) barriers, threadgroup
// memory and simdgroup/quadgroup collectives, (9) the MLX prelude subset.
#pragma once

#include <stddef.h>
#include <stdint.h>

// ---------------------------------------------------------------------------------------------
// (1) ABI shared with mtl_runtime.cpp (and mirrored by ctypes in compiler.py).
// ---------------------------------------------------------------------------------------------
extern "C" {
struct mtl_rt_u3 {
  uint32_t x, y, z;
};

// Every Metal kernel attribute MLX can pass, for one thread.
struct mtl_rt_thread_attrs {
  mtl_rt_u3 dispatch_threads_per_threadgroup;
  mtl_rt_u3 grid_origin;
  mtl_rt_u3 grid_size;
  mtl_rt_u3 thread_position_in_grid;
  mtl_rt_u3 thread_position_in_threadgroup;
  mtl_rt_u3 threadgroup_position_in_grid;
  mtl_rt_u3 threadgroups_per_grid;
  mtl_rt_u3 threads_per_grid;
  mtl_rt_u3 threads_per_threadgroup;
  uint32_t dispatch_quadgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t thread_execution_width;
  uint32_t thread_index_in_quadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t thread_index_in_threadgroup;
  uint32_t threads_per_simdgroup;
};

typedef void (*mtl_rt_entry_fn)(void* const* buffers, const struct mtl_rt_thread_attrs* attrs);

// One launch: inputs set by Python, error fields set by the runtime.
struct mtl_rt_launch {
  void* const* buffers;
  uint32_t n_buffers;
  uint32_t grid[3];
  uint32_t threadgroup[3];  // already min(threadgroup, grid) per dimension
  uint64_t seed;
  int32_t randomize;         // 0: threads and threadgroups in index order; 1: seeded shuffles
  uint32_t stack_bytes;      // per fiber
  uint32_t max_threadgroup_memory;
  // Results.
  int32_t error;  // MTL_RT_OK or one of MTL_RT_ERR_*
  int32_t fault_signal;
  int32_t fault_write;  // 1 write, 0 read, -1 unknown
  uint64_t fault_addr;
  uint64_t fault_pc_offset;  // pc relative to the kernel library's load address
  uint32_t err_thread[3];    // thread_position_in_grid of the offending thread
  uint32_t err_threadgroup[3];
  int32_t err_line;
  char err_file[256];
  char message[2048];
};

enum {
  MTL_RT_OK = 0,
  MTL_RT_ERR_BARRIER = 1,  // barrier / collective divergence or deadlock
  MTL_RT_ERR_FAULT = 2,    // memory fault (out of bounds) or arithmetic trap
  MTL_RT_ERR_LIMIT = 3,    // resource limit (threadgroup memory)
  MTL_RT_ERR_INTERNAL = 4,
};

enum {
  MTL_RT_OP_BARRIER = 0,
  MTL_RT_OP_SIMD = 1,  // simdgroup collectives (incl. simdgroup_barrier)
  MTL_RT_OP_QUAD = 2,
};

// Collective exchange: the caller's value is deposited in its lane slot, the fiber waits for
// the other active lanes, and the returned view holds every lane's slot.
#define MTL_RT_SLOT_BYTES 64
struct mtl_rt_simd_view {
  const unsigned char* slots;  // 32 slots of MTL_RT_SLOT_BYTES
  uint32_t active;             // bit l set if lane l took part
  uint32_t lane;               // caller's lane in the simdgroup
};

struct mtl_rt_simd_view mtl_rt_simd_exchange(const void* value, uint32_t size, int op,
                                             const char* what, int line, const char* file);
void mtl_rt_threadgroup_barrier(int line, const char* file);
void* mtl_rt_tg_alloc(int site, size_t size, size_t align, const char* name, int line,
                      const char* file);

// Guarded buffers (used by the Python launcher).
void* mtl_rt_buffer_alloc(size_t nbytes, int fill);
int mtl_rt_buffer_protect_readonly(void* data);
long long mtl_rt_buffer_check_slack(void* data);
void mtl_rt_buffer_free(void* data);
int mtl_rt_launch_kernel(struct mtl_rt_launch* launch, mtl_rt_entry_fn entry);
}

#ifndef MTL_SHIM_ABI_ONLY

#include <type_traits>

// ---------------------------------------------------------------------------------------------
// (2) Address spaces (erased), attribute helpers, scalar types.
// Threadgroup *declarations* are rewritten by the Python driver into per-threadgroup shared,
// poisoned storage; the remaining uses of the keyword (pointer types, parameters) are erased.
// ---------------------------------------------------------------------------------------------
#define device
#define constant
#define thread
#define threadgroup
#define threadgroup_imageblock
#define ray_data
#define object_data
#define METAL_FUNC inline __attribute__((always_inline))
#define MTL_CONST
#define MLX_MTL_PRAGMA_UNROLL

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;

// Metal half literals: 1.0h.
constexpr half operator""h(long double v) { return static_cast<half>(v); }
constexpr half operator""h(unsigned long long v) { return static_cast<half>(v); }

namespace metal {

// ---------------------------------------------------------------------------------------------
// (3) bfloat: storage-only 16-bit brain float. Per MSL 3.1 it converts implicitly only to
// float (widening); float/half -> bfloat needs an explicit cast, which rounds to nearest even.
// Arithmetic between two bfloats yields a bfloat (computed in float, rounded once).
// ---------------------------------------------------------------------------------------------
struct bfloat {
  uint16_t bits_;

  struct bits_tag {};
  constexpr bfloat(bits_tag, uint16_t bits) : bits_(bits) {}
  bfloat() = default;

  static constexpr uint16_t round_from_float(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN stays NaN (quiet)
    }
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;  // round to nearest, ties to even
    return static_cast<uint16_t>(u >> 16);
  }

  constexpr explicit bfloat(float f) : bits_(round_from_float(f)) {}
  template <class T, class = std::enable_if_t<std::is_arithmetic_v<T>>>
  constexpr explicit bfloat(T v) : bits_(round_from_float(static_cast<float>(v))) {}

  constexpr operator float() const {
    return __builtin_bit_cast(float, static_cast<uint32_t>(bits_) << 16);
  }

  constexpr bfloat& operator+=(bfloat o) { return *this = bfloat(float(*this) + float(o)); }
  constexpr bfloat& operator-=(bfloat o) { return *this = bfloat(float(*this) - float(o)); }
  constexpr bfloat& operator*=(bfloat o) { return *this = bfloat(float(*this) * float(o)); }
  constexpr bfloat& operator/=(bfloat o) { return *this = bfloat(float(*this) / float(o)); }
  friend constexpr bfloat operator+(bfloat a, bfloat b) { return bfloat(float(a) + float(b)); }
  friend constexpr bfloat operator-(bfloat a, bfloat b) { return bfloat(float(a) - float(b)); }
  friend constexpr bfloat operator*(bfloat a, bfloat b) { return bfloat(float(a) * float(b)); }
  friend constexpr bfloat operator/(bfloat a, bfloat b) { return bfloat(float(a) / float(b)); }
  friend constexpr bfloat operator-(bfloat a) { return bfloat(bits_tag{}, a.bits_ ^ 0x8000u); }
  friend constexpr bfloat operator+(bfloat a) { return a; }
};

template <class T>
struct is_scalar_float : std::bool_constant<std::is_floating_point_v<T> ||
                                            std::is_same_v<T, half> ||
                                            std::is_same_v<T, bfloat>> {};

// ---------------------------------------------------------------------------------------------
// (4) Vectors: vec<T, N> with .x .y .z .w, [i], elementwise arithmetic, scalar broadcast.
// Size and alignment follow Metal (3-vectors occupy 4 elements). No swizzles.
// ---------------------------------------------------------------------------------------------
namespace mtl_detail {
template <class T, int N>
struct vec_storage;
template <class T>
struct alignas(2 * sizeof(T)) vec_storage<T, 2> {
  T x, y;
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 3> {
  T x, y, z;
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  T x, y, z, w;
};
}  // namespace mtl_detail

template <class T, int N>
struct vec : mtl_detail::vec_storage<T, N> {
  static_assert(N >= 2 && N <= 4, "Metal vectors have 2, 3 or 4 elements");
  using value_type = T;

  vec() = default;
  vec(T s) {  // NOLINT: Metal broadcasts scalars implicitly
    for (int i = 0; i < N; ++i) (*this)[i] = s;
  }
  vec(T a, T b)
    requires(N == 2)
  {
    this->x = a;
    this->y = b;
  }
  vec(T a, T b, T c)
    requires(N == 3)
  {
    this->x = a;
    this->y = b;
    this->z = c;
  }
  vec(T a, T b, T c, T d)
    requires(N == 4)
  {
    this->x = a;
    this->y = b;
    this->z = c;
    this->w = d;
  }
  vec(vec<T, 2> a, T c)
    requires(N == 3)
  {
    this->x = a.x;
    this->y = a.y;
    this->z = c;
  }
  vec(vec<T, 2> a, T c, T d)
    requires(N == 4)
  {
    this->x = a.x;
    this->y = a.y;
    this->z = c;
    this->w = d;
  }
  vec(vec<T, 2> a, vec<T, 2> b)
    requires(N == 4)
  {
    this->x = a.x;
    this->y = a.y;
    this->z = b.x;
    this->w = b.y;
  }
  vec(vec<T, 3> a, T d)
    requires(N == 4)
  {
    this->x = a.x;
    this->y = a.y;
    this->z = a.z;
    this->w = d;
  }
  template <class U>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) (*this)[i] = static_cast<T>(o[i]);
  }

  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }

  // Read-only swizzles: the driver rewrites `v.xy` / `v.zyx` / `v.rgba` into `swz<...>()`.
  template <int... I>
  vec<T, int(sizeof...(I))> swz() const {
    static_assert(((I < N) && ...), "swizzle component out of range");
    return vec<T, int(sizeof...(I))>((*this)[I]...);
  }

#define MTL_VEC_BINARY(op)                                                \
  friend vec operator op(vec a, const vec& b) {                           \
    for (int i = 0; i < N; ++i) a[i] = static_cast<T>(a[i] op b[i]);      \
    return a;                                                             \
  }                                                                       \
  vec& operator op##=(const vec & b) {                                    \
    for (int i = 0; i < N; ++i) (*this)[i] = static_cast<T>((*this)[i] op b[i]); \
    return *this;                                                         \
  }
  MTL_VEC_BINARY(+)
  MTL_VEC_BINARY(-)
  MTL_VEC_BINARY(*)
  MTL_VEC_BINARY(/)
  MTL_VEC_BINARY(%)
  MTL_VEC_BINARY(&)
  MTL_VEC_BINARY(|)
  MTL_VEC_BINARY(^)
  MTL_VEC_BINARY(<<)
  MTL_VEC_BINARY(>>)
#undef MTL_VEC_BINARY

#define MTL_VEC_COMPARE(op)                                     \
  friend vec<bool, N> operator op(const vec& a, const vec& b) { \
    vec<bool, N> r;                                             \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];            \
    return r;                                                   \
  }
  MTL_VEC_COMPARE(==)
  MTL_VEC_COMPARE(!=)
  MTL_VEC_COMPARE(<)
  MTL_VEC_COMPARE(<=)
  MTL_VEC_COMPARE(>)
  MTL_VEC_COMPARE(>=)
  MTL_VEC_COMPARE(&&)
  MTL_VEC_COMPARE(||)
#undef MTL_VEC_COMPARE

  friend vec operator-(vec a) {
    for (int i = 0; i < N; ++i) a[i] = -a[i];
    return a;
  }
  friend vec operator+(vec a) { return a; }
  friend vec operator~(vec a) {
    for (int i = 0; i < N; ++i) a[i] = ~a[i];
    return a;
  }
  friend vec<bool, N> operator!(const vec& a) {
    vec<bool, N> r;
    for (int i = 0; i < N; ++i) r[i] = !a[i];
    return r;
  }
};

#define MTL_VEC_ALIASES(T, name) \
  typedef vec<T, 2> name##2;     \
  typedef vec<T, 3> name##3;     \
  typedef vec<T, 4> name##4;
MTL_VEC_ALIASES(float, float)
MTL_VEC_ALIASES(half, half)
MTL_VEC_ALIASES(bfloat, bfloat)
MTL_VEC_ALIASES(int, int)
MTL_VEC_ALIASES(uint, uint)
MTL_VEC_ALIASES(short, short)
MTL_VEC_ALIASES(ushort, ushort)
MTL_VEC_ALIASES(char, char)
MTL_VEC_ALIASES(uchar, uchar)
MTL_VEC_ALIASES(long, long)
MTL_VEC_ALIASES(ulong, ulong)
MTL_VEC_ALIASES(bool, bool)
#undef MTL_VEC_ALIASES

template <class T>
struct is_vector : std::false_type {};
template <class T, int N>
struct is_vector<vec<T, N>> : std::true_type {};

template <int N>
METAL_FUNC bool all(vec<bool, N> v) {
  for (int i = 0; i < N; ++i)
    if (!v[i]) return false;
  return true;
}
template <int N>
METAL_FUNC bool any(vec<bool, N> v) {
  for (int i = 0; i < N; ++i)
    if (v[i]) return true;
  return false;
}
METAL_FUNC bool all(bool v) { return v; }
METAL_FUNC bool any(bool v) { return v; }

// select(a, b, c): c ? b : a (per element).
template <class T>
METAL_FUNC std::enable_if_t<!is_vector<T>::value, T> select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N>
METAL_FUNC vec<T, N> select(vec<T, N> a, vec<T, N> b, vec<bool, N> c) {
  for (int i = 0; i < N; ++i) a[i] = c[i] ? b[i] : a[i];
  return a;
}
template <class T, int N>
METAL_FUNC vec<T, N> select(vec<T, N> a, vec<T, N> b, bool c) {
  return c ? b : a;
}

// ---------------------------------------------------------------------------------------------
// (5) Math: float, half and bfloat overloads (half and bfloat computed in float and rounded
// back, like MLX's bf16_math.h does for bfloat), elementwise on vectors. `fast::` and
// `precise::` share the implementations: approximation differences are not emulated.
// ---------------------------------------------------------------------------------------------
#define MTL_UNARY_MATH(name, fimpl)                                              \
  METAL_FUNC float name(float x) { return fimpl(x); }                            \
  METAL_FUNC half name(half x) { return static_cast<half>(fimpl(float(x))); }    \
  METAL_FUNC bfloat name(bfloat x) { return bfloat(fimpl(float(x))); }           \
  template <class T, int N>                                                      \
  METAL_FUNC vec<T, N> name(vec<T, N> v) {                                       \
    for (int i = 0; i < N; ++i) v[i] = name(v[i]);                               \
    return v;                                                                    \
  }

#define MTL_BINARY_MATH(name, fimpl)                                                         \
  METAL_FUNC float name(float x, float y) { return fimpl(x, y); }                            \
  METAL_FUNC half name(half x, half y) { return static_cast<half>(fimpl(float(x), float(y))); } \
  METAL_FUNC bfloat name(bfloat x, bfloat y) { return bfloat(fimpl(float(x), float(y))); }   \
  template <class T, int N>                                                                  \
  METAL_FUNC vec<T, N> name(vec<T, N> a, vec<T, N> b) {                                      \
    for (int i = 0; i < N; ++i) a[i] = name(a[i], b[i]);                                     \
    return a;                                                                                \
  }

namespace mtl_detail {
inline float rsqrt_f(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float exp10_f(float x) { return __builtin_powf(10.0f, x); }
inline float fract_f(float x) {
  float r = x - __builtin_floorf(x);
  return r < 0x1.fffffep-1f ? r : 0x1.fffffep-1f;
}
inline float sign_f(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? x : 0.0f));
}
inline float saturate_f(float x) { return __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f); }
inline float divide_f(float x, float y) { return x / y; }
inline float fmax_f(float x, float y) { return __builtin_fmaxf(x, y); }
inline float fmin_f(float x, float y) { return __builtin_fminf(x, y); }
inline float step_f(float edge, float x) { return x < edge ? 0.0f : 1.0f; }
}  // namespace mtl_detail

MTL_UNARY_MATH(exp, __builtin_expf)
MTL_UNARY_MATH(exp2, __builtin_exp2f)
MTL_UNARY_MATH(exp10, mtl_detail::exp10_f)
MTL_UNARY_MATH(log, __builtin_logf)
MTL_UNARY_MATH(log2, __builtin_log2f)
MTL_UNARY_MATH(log10, __builtin_log10f)
MTL_UNARY_MATH(sqrt, __builtin_sqrtf)
MTL_UNARY_MATH(rsqrt, mtl_detail::rsqrt_f)
MTL_UNARY_MATH(sin, __builtin_sinf)
MTL_UNARY_MATH(cos, __builtin_cosf)
MTL_UNARY_MATH(tan, __builtin_tanf)
MTL_UNARY_MATH(asin, __builtin_asinf)
MTL_UNARY_MATH(acos, __builtin_acosf)
MTL_UNARY_MATH(atan, __builtin_atanf)
MTL_UNARY_MATH(sinh, __builtin_sinhf)
MTL_UNARY_MATH(cosh, __builtin_coshf)
MTL_UNARY_MATH(tanh, __builtin_tanhf)
MTL_UNARY_MATH(asinh, __builtin_asinhf)
MTL_UNARY_MATH(acosh, __builtin_acoshf)
MTL_UNARY_MATH(atanh, __builtin_atanhf)
MTL_UNARY_MATH(floor, __builtin_floorf)
MTL_UNARY_MATH(ceil, __builtin_ceilf)
MTL_UNARY_MATH(round, __builtin_roundf)
MTL_UNARY_MATH(rint, __builtin_rintf)
MTL_UNARY_MATH(trunc, __builtin_truncf)
MTL_UNARY_MATH(fabs, __builtin_fabsf)
MTL_UNARY_MATH(fract, mtl_detail::fract_f)
MTL_UNARY_MATH(sign, mtl_detail::sign_f)
MTL_UNARY_MATH(saturate, mtl_detail::saturate_f)
MTL_BINARY_MATH(pow, __builtin_powf)
MTL_BINARY_MATH(powr, __builtin_powf)
MTL_BINARY_MATH(atan2, __builtin_atan2f)
MTL_BINARY_MATH(fmod, __builtin_fmodf)
MTL_BINARY_MATH(copysign, __builtin_copysignf)
MTL_BINARY_MATH(fmax, mtl_detail::fmax_f)
MTL_BINARY_MATH(fmin, mtl_detail::fmin_f)
MTL_BINARY_MATH(divide, mtl_detail::divide_f)
MTL_BINARY_MATH(step, mtl_detail::step_f)

// abs / min / max / clamp for every scalar type, and elementwise for vectors.
#define MTL_MINMAX(T)                                                          \
  METAL_FUNC T max(T a, T b) { return a < b ? b : a; }                         \
  METAL_FUNC T min(T a, T b) { return b < a ? b : a; }                         \
  METAL_FUNC T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }         \
  METAL_FUNC T max3(T a, T b, T c) { return max(max(a, b), c); }              \
  METAL_FUNC T min3(T a, T b, T c) { return min(min(a, b), c); }              \
  METAL_FUNC T median3(T a, T b, T c) { return max(min(a, b), min(max(a, b), c)); }
MTL_MINMAX(int)
MTL_MINMAX(uint)
MTL_MINMAX(long)
MTL_MINMAX(ulong)
MTL_MINMAX(short)
MTL_MINMAX(ushort)
MTL_MINMAX(char)
MTL_MINMAX(uchar)
MTL_MINMAX(signed char)
#undef MTL_MINMAX
// Floating max/min follow fmax/fmin (a NaN operand is ignored), as Metal documents.
#define MTL_FMINMAX(T)                                                                   \
  METAL_FUNC T max(T a, T b) { return T(__builtin_fmaxf(float(a), float(b))); }          \
  METAL_FUNC T min(T a, T b) { return T(__builtin_fminf(float(a), float(b))); }          \
  METAL_FUNC T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }                   \
  METAL_FUNC T max3(T a, T b, T c) { return max(max(a, b), c); }                        \
  METAL_FUNC T min3(T a, T b, T c) { return min(min(a, b), c); }                        \
  METAL_FUNC T median3(T a, T b, T c) { return max(min(a, b), min(max(a, b), c)); }
MTL_FMINMAX(float)
MTL_FMINMAX(half)
MTL_FMINMAX(bfloat)
#undef MTL_FMINMAX
template <class T, int N>
METAL_FUNC vec<T, N> max(vec<T, N> a, vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = max(a[i], b[i]);
  return a;
}
template <class T, int N>
METAL_FUNC vec<T, N> min(vec<T, N> a, vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = min(a[i], b[i]);
  return a;
}
template <class T, int N>
METAL_FUNC vec<T, N> clamp(vec<T, N> x, vec<T, N> lo, vec<T, N> hi) {
  return min(max(x, lo), hi);
}

METAL_FUNC int abs(int x) { return x < 0 ? -x : x; }
METAL_FUNC long abs(long x) { return x < 0 ? -x : x; }
METAL_FUNC short abs(short x) { return x < 0 ? short(-x) : x; }
METAL_FUNC char abs(char x) { return x < 0 ? char(-x) : x; }
METAL_FUNC uint abs(uint x) { return x; }
METAL_FUNC ulong abs(ulong x) { return x; }
METAL_FUNC float abs(float x) { return __builtin_fabsf(x); }
METAL_FUNC half abs(half x) { return static_cast<half>(__builtin_fabsf(float(x))); }
METAL_FUNC bfloat abs(bfloat x) { return bfloat(bfloat::bits_tag{}, x.bits_ & 0x7fffu); }
template <class T, int N>
METAL_FUNC vec<T, N> abs(vec<T, N> v) {
  for (int i = 0; i < N; ++i) v[i] = abs(v[i]);
  return v;
}

METAL_FUNC float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
METAL_FUNC half fma(half a, half b, half c) {
  return static_cast<half>(__builtin_fmaf(float(a), float(b), float(c)));
}
METAL_FUNC bfloat fma(bfloat a, bfloat b, bfloat c) {
  return bfloat(__builtin_fmaf(float(a), float(b), float(c)));
}
template <class T, int N>
METAL_FUNC vec<T, N> fma(vec<T, N> a, vec<T, N> b, vec<T, N> c) {
  for (int i = 0; i < N; ++i) a[i] = fma(a[i], b[i], c[i]);
  return a;
}
template <class T>
METAL_FUNC T mix(T x, T y, T a) {
  return x + (y - x) * a;
}
template <class T>
METAL_FUNC T smoothstep(T e0, T e1, T x) {
  T t = clamp((x - e0) / (e1 - e0), T(0), T(1));
  return t * t * (T(3) - T(2) * t);
}

METAL_FUNC bool isnan(float x) { return __builtin_isnan(x); }
METAL_FUNC bool isinf(float x) { return __builtin_isinf(x); }
METAL_FUNC bool isfinite(float x) { return __builtin_isfinite(x); }
METAL_FUNC bool signbit(float x) { return __builtin_signbit(x); }
METAL_FUNC bool isnan(half x) { return __builtin_isnan(float(x)); }
METAL_FUNC bool isinf(half x) { return __builtin_isinf(float(x)); }
METAL_FUNC bool isfinite(half x) { return __builtin_isfinite(float(x)); }
METAL_FUNC bool signbit(half x) { return __builtin_signbit(float(x)); }
METAL_FUNC bool isnan(bfloat x) { return __builtin_isnan(float(x)); }
METAL_FUNC bool isinf(bfloat x) { return __builtin_isinf(float(x)); }
METAL_FUNC bool isfinite(bfloat x) { return __builtin_isfinite(float(x)); }
METAL_FUNC bool signbit(bfloat x) { return (x.bits_ & 0x8000u) != 0; }
template <class T, int N>
METAL_FUNC vec<bool, N> isnan(vec<T, N> v) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = isnan(v[i]);
  return r;
}
template <class T, int N>
METAL_FUNC vec<bool, N> isinf(vec<T, N> v) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = isinf(v[i]);
  return r;
}

template <class T, int N>
METAL_FUNC T dot(vec<T, N> a, vec<T, N> b) {
  T s = a[0] * b[0];
  for (int i = 1; i < N; ++i) s = s + a[i] * b[i];
  return s;
}
template <class T, int N>
METAL_FUNC T length(vec<T, N> a) {
  return sqrt(dot(a, a));
}
template <class T, int N>
METAL_FUNC T distance(vec<T, N> a, vec<T, N> b) {
  return length(a - b);
}
template <class T, int N>
METAL_FUNC vec<T, N> normalize(vec<T, N> a) {
  return a * rsqrt(dot(a, a));
}
template <class T>
METAL_FUNC vec<T, 3> cross(vec<T, 3> a, vec<T, 3> b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}

// Integer bit functions.
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
METAL_FUNC T popcount(T x) {
  return static_cast<T>(__builtin_popcountll(static_cast<unsigned long long>(
      static_cast<std::make_unsigned_t<T>>(x))));
}
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
METAL_FUNC T clz(T x) {
  using U = std::make_unsigned_t<T>;
  U u = static_cast<U>(x);
  return u == 0 ? T(sizeof(T) * 8)
                : static_cast<T>(__builtin_clzll(u) - (64 - int(sizeof(T)) * 8));
}
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
METAL_FUNC T ctz(T x) {
  using U = std::make_unsigned_t<T>;
  U u = static_cast<U>(x);
  return u == 0 ? T(sizeof(T) * 8) : static_cast<T>(__builtin_ctzll(u));
}
METAL_FUNC uint mulhi(uint a, uint b) { return uint((uint64_t(a) * uint64_t(b)) >> 32); }
METAL_FUNC int mulhi(int a, int b) { return int((int64_t(a) * int64_t(b)) >> 32); }

// as_type<T>(x): bit reinterpretation between same-sized types.
template <class To, class From>
METAL_FUNC To as_type(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  To r;
  __builtin_memcpy(&r, &v, sizeof(To));
  return r;
}

namespace fast {
using metal::abs, metal::acos, metal::asin, metal::atan, metal::atan2, metal::ceil, metal::clamp,
    metal::copysign, metal::cos, metal::cosh, metal::divide, metal::exp, metal::exp10,
    metal::exp2, metal::fabs, metal::floor, metal::fmax, metal::fmin, metal::fmod, metal::fract,
    metal::log, metal::log10, metal::log2, metal::max, metal::min, metal::pow, metal::powr,
    metal::rint, metal::round, metal::rsqrt, metal::saturate, metal::sign, metal::sin,
    metal::sinh, metal::sqrt, metal::tan, metal::tanh, metal::trunc, metal::normalize,
    metal::length, metal::distance, metal::step;
}  // namespace fast
namespace precise {
using metal::abs, metal::acos, metal::asin, metal::atan, metal::atan2, metal::ceil, metal::clamp,
    metal::copysign, metal::cos, metal::cosh, metal::divide, metal::exp, metal::exp10,
    metal::exp2, metal::fabs, metal::floor, metal::fmax, metal::fmin, metal::fmod, metal::fract,
    metal::log, metal::log10, metal::log2, metal::max, metal::min, metal::pow, metal::powr,
    metal::rint, metal::round, metal::rsqrt, metal::saturate, metal::sign, metal::sin,
    metal::sinh, metal::sqrt, metal::tan, metal::tanh, metal::trunc, metal::normalize,
    metal::length, metal::distance, metal::step;
}  // namespace precise

// ---------------------------------------------------------------------------------------------
// (6) numeric_limits and type traits (metal_type_traits subset).
// ---------------------------------------------------------------------------------------------
template <class T>
struct numeric_limits;
template <>
struct numeric_limits<float> {
  static constexpr bool is_specialized = true;
  static constexpr float min() { return __FLT_MIN__; }
  static constexpr float max() { return __FLT_MAX__; }
  static constexpr float lowest() { return -__FLT_MAX__; }
  static constexpr float epsilon() { return __FLT_EPSILON__; }
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
  static constexpr float denorm_min() { return __FLT_DENORM_MIN__; }
};
template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr half min() { return static_cast<half>(6.103515625e-05f); }
  static constexpr half max() { return static_cast<half>(65504.0f); }
  static constexpr half lowest() { return static_cast<half>(-65504.0f); }
  static constexpr half epsilon() { return static_cast<half>(0.0009765625f); }
  static constexpr half infinity() { return static_cast<half>(__builtin_inff()); }
  static constexpr half quiet_NaN() { return static_cast<half>(__builtin_nanf("")); }
  static constexpr half denorm_min() { return static_cast<half>(5.9604644775390625e-08f); }
};
template <>
struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bfloat min() { return bfloat(bfloat::bits_tag{}, 0x0080); }
  static constexpr bfloat max() { return bfloat(bfloat::bits_tag{}, 0x7f7f); }
  static constexpr bfloat lowest() { return bfloat(bfloat::bits_tag{}, 0xff7f); }
  static constexpr bfloat epsilon() { return bfloat(bfloat::bits_tag{}, 0x3c00); }
  static constexpr bfloat infinity() { return bfloat(bfloat::bits_tag{}, 0x7f80); }
  static constexpr bfloat quiet_NaN() { return bfloat(bfloat::bits_tag{}, 0x7fc0); }
  static constexpr bfloat denorm_min() { return bfloat(bfloat::bits_tag{}, 0x0001); }
};
#define MTL_INT_LIMITS(T, lo, hi)                              \
  template <>                                                  \
  struct numeric_limits<T> {                                   \
    static constexpr bool is_specialized = true;               \
    static constexpr T min() { return lo; }                    \
    static constexpr T max() { return hi; }                    \
    static constexpr T lowest() { return lo; }                 \
  };
MTL_INT_LIMITS(bool, false, true)
MTL_INT_LIMITS(char, char(-128), char(127))
MTL_INT_LIMITS(signed char, -128, 127)
MTL_INT_LIMITS(uchar, 0, 255)
MTL_INT_LIMITS(short, -32768, 32767)
MTL_INT_LIMITS(ushort, 0, 65535)
MTL_INT_LIMITS(int, (-2147483647 - 1), 2147483647)
MTL_INT_LIMITS(uint, 0u, 4294967295u)
MTL_INT_LIMITS(long, (-9223372036854775807L - 1), 9223372036854775807L)
MTL_INT_LIMITS(ulong, 0ul, 18446744073709551615ul)
#undef MTL_INT_LIMITS

using std::conditional;
using std::conditional_t;
using std::enable_if;
using std::enable_if_t;
using std::integral_constant;
using std::is_convertible;
using std::is_convertible_v;
using std::is_integral;
using std::is_integral_v;
using std::is_same;
using std::is_same_v;
using std::is_signed;
using std::is_signed_v;
using std::is_unsigned;
using std::is_unsigned_v;
using std::make_signed;
using std::make_signed_t;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_cv;
using std::remove_cv_t;
using std::true_type;
using std::false_type;
template <class T>
struct is_floating_point : is_scalar_float<std::remove_cv_t<T>> {};
template <class T>
constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T>
struct is_arithmetic
    : std::bool_constant<std::is_integral_v<T> || is_floating_point<T>::value> {};
template <class T>
constexpr bool is_arithmetic_v = is_arithmetic<T>::value;

// ---------------------------------------------------------------------------------------------
// (7) Atomics. Fibers switch only at barriers and collectives, so every read-modify-write
// below is atomic with respect to the other emulated threads.
// ---------------------------------------------------------------------------------------------
enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst,
};
template <class T>
struct atomic {
  T value_;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;
typedef atomic<long> atomic_long;

template <class T, class U>
METAL_FUNC void atomic_store_explicit(atomic<T>* obj, U v, memory_order = memory_order_relaxed) {
  obj->value_ = static_cast<T>(v);
}
template <class T>
METAL_FUNC T atomic_load_explicit(const atomic<T>* obj, memory_order = memory_order_relaxed) {
  return obj->value_;
}
template <class T, class U>
METAL_FUNC T atomic_exchange_explicit(atomic<T>* obj, U v, memory_order = memory_order_relaxed) {
  T old = obj->value_;
  obj->value_ = static_cast<T>(v);
  return old;
}
template <class T, class U>
METAL_FUNC bool atomic_compare_exchange_weak_explicit(atomic<T>* obj, T* expected, U desired,
                                                      memory_order = memory_order_relaxed,
                                                      memory_order = memory_order_relaxed) {
  if (__builtin_memcmp(&obj->value_, expected, sizeof(T)) == 0) {
    obj->value_ = static_cast<T>(desired);
    return true;
  }
  *expected = obj->value_;
  return false;
}
template <class T, class U>
METAL_FUNC bool atomic_compare_exchange_strong_explicit(atomic<T>* obj, T* expected, U desired,
                                                        memory_order s = memory_order_relaxed,
                                                        memory_order f = memory_order_relaxed) {
  return atomic_compare_exchange_weak_explicit(obj, expected, desired, s, f);
}
#define MTL_ATOMIC_RMW(name, expr)                                            \
  template <class T, class U>                                                 \
  METAL_FUNC T name(atomic<T>* obj, U operand, memory_order = memory_order_relaxed) { \
    T old = obj->value_;                                                      \
    T v = static_cast<T>(operand);                                            \
    obj->value_ = static_cast<T>(expr);                                       \
    return old;                                                               \
  }
MTL_ATOMIC_RMW(atomic_fetch_add_explicit, old + v)
MTL_ATOMIC_RMW(atomic_fetch_sub_explicit, old - v)
MTL_ATOMIC_RMW(atomic_fetch_and_explicit, old & v)
MTL_ATOMIC_RMW(atomic_fetch_or_explicit, old | v)
MTL_ATOMIC_RMW(atomic_fetch_xor_explicit, old ^ v)
MTL_ATOMIC_RMW(atomic_fetch_max_explicit, (old < v ? v : old))
MTL_ATOMIC_RMW(atomic_fetch_min_explicit, (v < old ? v : old))
#undef MTL_ATOMIC_RMW

// ---------------------------------------------------------------------------------------------
// (8) Barriers, threadgroup memory, simdgroup and quadgroup collectives. The source line of
// each call site is taken from __builtin_LINE()/__builtin_FILE() default arguments, so error
// messages name the line of the kernel source that holds the barrier.
// ---------------------------------------------------------------------------------------------
enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return static_cast<mem_flags>(static_cast<uint>(a) | static_cast<uint>(b));
}

METAL_FUNC void threadgroup_barrier(mem_flags, int line = __builtin_LINE(),
                                    const char* file = __builtin_FILE()) {
  mtl_rt_threadgroup_barrier(line, file);
}
METAL_FUNC void simdgroup_barrier(mem_flags, int line = __builtin_LINE(),
                                  const char* file = __builtin_FILE()) {
  mtl_rt_simd_exchange(nullptr, 0, MTL_RT_OP_SIMD, "simdgroup_barrier", line, file);
}

namespace mtl_detail {
template <class T>
struct simd_group {
  mtl_rt_simd_view v;
  uint32_t width;  // 32 for simdgroups, 4 for quadgroups
  uint32_t base;   // first lane of the caller's group within the simdgroup

  simd_group(const T& x, int op, const char* what, int line, const char* file) {
    static_assert(sizeof(T) <= MTL_RT_SLOT_BYTES, "type too large for a simd collective");
    v = mtl_rt_simd_exchange(&x, sizeof(T), op, what, line, file);
    width = op == MTL_RT_OP_QUAD ? 4u : 32u;
    base = v.lane & ~(width - 1u);
  }
  uint32_t lane() const { return v.lane - base; }  // index within the group
  bool active(uint32_t l) const { return l < width && ((v.active >> (base + l)) & 1u); }
  T at(uint32_t l) const {  // value of group lane l; poison (0xFF bytes) if it is inactive
    T r;
    if (active(l)) {
      __builtin_memcpy(&r, v.slots + (base + l) * MTL_RT_SLOT_BYTES, sizeof(T));
    } else {
      __builtin_memset(&r, 0xff, sizeof(T));
    }
    return r;
  }
  uint32_t first_active() const {
    for (uint32_t l = 0; l < width; ++l)
      if (active(l)) return l;
    return 0;
  }
};

// Reductions accumulate bfloat in float, as MLX's bf16 simd overloads do.
template <class T>
struct accum {
  using type = T;
};
template <>
struct accum<bfloat> {
  using type = float;
};

struct op_sum {
  template <class A>
  static A apply(A a, A b) {
    return a + b;
  }
};
struct op_prod {
  template <class A>
  static A apply(A a, A b) {
    return a * b;
  }
};
struct op_max {
  template <class A>
  static A apply(A a, A b) {
    return metal::max(a, b);
  }
};
struct op_min {
  template <class A>
  static A apply(A a, A b) {
    return metal::min(a, b);
  }
};
struct op_and {
  template <class A>
  static A apply(A a, A b) {
    return a & b;
  }
};
struct op_or {
  template <class A>
  static A apply(A a, A b) {
    return a | b;
  }
};
struct op_xor {
  template <class A>
  static A apply(A a, A b) {
    return a ^ b;
  }
};

template <class Op, class T>
METAL_FUNC T reduce(const T& x, int op, const char* what, int line, const char* file) {
  using A = typename accum<T>::type;
  simd_group<T> g(x, op, what, line, file);
  bool have = false;
  A acc{};
  for (uint32_t l = 0; l < g.width; ++l) {
    if (!g.active(l)) continue;
    A v = static_cast<A>(g.at(l));
    acc = have ? static_cast<A>(Op::apply(acc, v)) : v;
    have = true;
  }
  return static_cast<T>(acc);
}

// Prefix scans over the active lanes below the caller (exclusive) or up to it (inclusive).
template <class Op, class T>
METAL_FUNC T scan(const T& x, bool inclusive, T identity, int op, const char* what, int line,
                  const char* file) {
  using A = typename accum<T>::type;
  simd_group<T> g(x, op, what, line, file);
  A acc = static_cast<A>(identity);
  uint32_t end = inclusive ? g.lane() + 1 : g.lane();
  for (uint32_t l = 0; l < end; ++l) {
    if (g.active(l)) acc = static_cast<A>(Op::apply(acc, static_cast<A>(g.at(l))));
  }
  return static_cast<T>(acc);
}
}  // namespace mtl_detail

#define MTL_LOC int line = __builtin_LINE(), const char *file = __builtin_FILE()

#define MTL_REDUCTION(prefix, opcode, name, Op)                                  \
  template <class T>                                                             \
  METAL_FUNC T prefix##_##name(T x, MTL_LOC) {                                   \
    return mtl_detail::reduce<mtl_detail::Op>(x, opcode, #prefix "_" #name, line, file); \
  }
MTL_REDUCTION(simd, MTL_RT_OP_SIMD, sum, op_sum)
MTL_REDUCTION(simd, MTL_RT_OP_SIMD, product, op_prod)
MTL_REDUCTION(simd, MTL_RT_OP_SIMD, max, op_max)
MTL_REDUCTION(simd, MTL_RT_OP_SIMD, min, op_min)
MTL_REDUCTION(simd, MTL_RT_OP_SIMD, and, op_and)
MTL_REDUCTION(simd, MTL_RT_OP_SIMD, or, op_or)
MTL_REDUCTION(simd, MTL_RT_OP_SIMD, xor, op_xor)
MTL_REDUCTION(quad, MTL_RT_OP_QUAD, sum, op_sum)
MTL_REDUCTION(quad, MTL_RT_OP_QUAD, product, op_prod)
MTL_REDUCTION(quad, MTL_RT_OP_QUAD, max, op_max)
MTL_REDUCTION(quad, MTL_RT_OP_QUAD, min, op_min)
MTL_REDUCTION(quad, MTL_RT_OP_QUAD, and, op_and)
MTL_REDUCTION(quad, MTL_RT_OP_QUAD, or, op_or)
MTL_REDUCTION(quad, MTL_RT_OP_QUAD, xor, op_xor)
#undef MTL_REDUCTION

#define MTL_SCAN(prefix, opcode, name, Op, inclusive, identity)                          \
  template <class T>                                                                     \
  METAL_FUNC T prefix##_##name(T x, MTL_LOC) {                                           \
    return mtl_detail::scan<mtl_detail::Op>(x, inclusive, static_cast<T>(identity), opcode, \
                                            #prefix "_" #name, line, file);              \
  }
MTL_SCAN(simd, MTL_RT_OP_SIMD, prefix_inclusive_sum, op_sum, true, 0)
MTL_SCAN(simd, MTL_RT_OP_SIMD, prefix_exclusive_sum, op_sum, false, 0)
MTL_SCAN(simd, MTL_RT_OP_SIMD, prefix_inclusive_product, op_prod, true, 1)
MTL_SCAN(simd, MTL_RT_OP_SIMD, prefix_exclusive_product, op_prod, false, 1)
MTL_SCAN(quad, MTL_RT_OP_QUAD, prefix_inclusive_sum, op_sum, true, 0)
MTL_SCAN(quad, MTL_RT_OP_QUAD, prefix_exclusive_sum, op_sum, false, 0)
MTL_SCAN(quad, MTL_RT_OP_QUAD, prefix_inclusive_product, op_prod, true, 1)
MTL_SCAN(quad, MTL_RT_OP_QUAD, prefix_exclusive_product, op_prod, false, 1)
#undef MTL_SCAN

// Shuffles. Reading an inactive lane yields poison; shifts past the group edge leave the
// caller's own value (simd_shuffle_up/down do not wrap, per MSL).
#define MTL_SHUFFLES(prefix, opcode)                                                      \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_shuffle(T x, ushort src, MTL_LOC) {                               \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_shuffle", line, file);               \
    return g.at(src);                                                                     \
  }                                                                                       \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_broadcast(T x, ushort src, MTL_LOC) {                             \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_broadcast", line, file);             \
    return g.at(src);                                                                     \
  }                                                                                       \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_broadcast_first(T x, MTL_LOC) {                                   \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_broadcast_first", line, file);       \
    return g.at(g.first_active());                                                        \
  }                                                                                       \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_shuffle_down(T x, ushort delta, MTL_LOC) {                        \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_shuffle_down", line, file);          \
    uint32_t src = g.lane() + delta;                                                      \
    return src < g.width ? g.at(src) : x;                                                 \
  }                                                                                       \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_shuffle_up(T x, ushort delta, MTL_LOC) {                          \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_shuffle_up", line, file);            \
    return g.lane() >= delta ? g.at(g.lane() - delta) : x;                                \
  }                                                                                       \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_shuffle_xor(T x, ushort mask, MTL_LOC) {                          \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_shuffle_xor", line, file);           \
    return g.at(g.lane() ^ mask);                                                         \
  }                                                                                       \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_shuffle_rotate_down(T x, ushort delta, MTL_LOC) {                 \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_shuffle_rotate_down", line, file);   \
    return g.at((g.lane() + delta) % g.width);                                            \
  }                                                                                       \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_shuffle_rotate_up(T x, ushort delta, MTL_LOC) {                   \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_shuffle_rotate_up", line, file);     \
    return g.at((g.lane() + g.width - (delta % g.width)) % g.width);                      \
  }                                                                                       \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_shuffle_and_fill_down(T x, T fill, ushort delta, MTL_LOC) {       \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_shuffle_and_fill_down", line, file); \
    uint32_t src = g.lane() + delta;                                                      \
    return src < g.width ? g.at(src) : fill;                                              \
  }                                                                                       \
  template <class T>                                                                      \
  METAL_FUNC T prefix##_shuffle_and_fill_up(T x, T fill, ushort delta, MTL_LOC) {         \
    mtl_detail::simd_group<T> g(x, opcode, #prefix "_shuffle_and_fill_up", line, file);   \
    return g.lane() >= delta ? g.at(g.lane() - delta) : fill;                             \
  }                                                                                       \
  METAL_FUNC bool prefix##_all(bool x, MTL_LOC) {                                         \
    mtl_detail::simd_group<bool> g(x, opcode, #prefix "_all", line, file);                \
    for (uint32_t l = 0; l < g.width; ++l)                                                \
      if (g.active(l) && !g.at(l)) return false;                                          \
    return true;                                                                          \
  }                                                                                       \
  METAL_FUNC bool prefix##_any(bool x, MTL_LOC) {                                         \
    mtl_detail::simd_group<bool> g(x, opcode, #prefix "_any", line, file);                \
    for (uint32_t l = 0; l < g.width; ++l)                                                \
      if (g.active(l) && g.at(l)) return true;                                            \
    return false;                                                                         \
  }                                                                                       \
  METAL_FUNC bool prefix##_is_first(MTL_LOC) {                                            \
    mtl_detail::simd_group<bool> g(true, opcode, #prefix "_is_first", line, file);        \
    return g.lane() == g.first_active();                                                  \
  }
MTL_SHUFFLES(simd, MTL_RT_OP_SIMD)
MTL_SHUFFLES(quad, MTL_RT_OP_QUAD)
#undef MTL_SHUFFLES

// simd_vote: a bit mask of lanes (simd_ballot, simd_active_threads_mask).
struct simd_vote {
  using vote_t = uint64_t;
  vote_t v;
  explicit constexpr simd_vote(vote_t bits = 0) : v(bits) {}
  explicit constexpr operator vote_t() const { return v; }
  constexpr bool all() const { return v == 0xffffffffull; }
  constexpr bool any() const { return v != 0; }
};
METAL_FUNC simd_vote simd_ballot(bool x, MTL_LOC) {
  mtl_detail::simd_group<bool> g(x, MTL_RT_OP_SIMD, "simd_ballot", line, file);
  uint64_t bits = 0;
  for (uint32_t l = 0; l < 32; ++l)
    if (g.active(l) && g.at(l)) bits |= 1ull << l;
  return simd_vote(bits);
}
METAL_FUNC simd_vote simd_active_threads_mask(MTL_LOC) {
  mtl_detail::simd_group<bool> g(true, MTL_RT_OP_SIMD, "simd_active_threads_mask", line, file);
  return simd_vote(g.v.active);
}
METAL_FUNC bool simd_is_helper_thread() { return false; }
#undef MTL_LOC

}  // namespace metal

using namespace metal;

// ---------------------------------------------------------------------------------------------
// (9) The subset of MLX's Metal prelude (mlx/backend/metal/kernels/utils.h and friends) that
// custom kernels use. Semantics follow MLX's documented behaviour; the code is our own.
// ---------------------------------------------------------------------------------------------
typedef bfloat bfloat16_t;
typedef half float16_t;

inline uint16_t bfloat16_to_uint16(bfloat16_t x) { return x.bits_; }
inline bfloat16_t uint16_to_bfloat16(uint16_t x) { return bfloat16_t(bfloat16_t::bits_tag{}, x); }

struct complex64_t {
  float real;
  float imag;
  constexpr complex64_t() : real(0), imag(0) {}
  constexpr complex64_t(float r, float i) : real(r), imag(i) {}
  template <class U, class = std::enable_if_t<std::is_arithmetic_v<U> ||
                                              std::is_same_v<U, half> ||
                                              std::is_same_v<U, bfloat>>>
  constexpr complex64_t(U x) : real(static_cast<float>(x)), imag(0) {}
  friend complex64_t operator+(complex64_t a, complex64_t b) {
    return {a.real + b.real, a.imag + b.imag};
  }
  friend complex64_t operator-(complex64_t a, complex64_t b) {
    return {a.real - b.real, a.imag - b.imag};
  }
  friend complex64_t operator*(complex64_t a, complex64_t b) {
    return {a.real * b.real - a.imag * b.imag, a.real * b.imag + a.imag * b.real};
  }
  friend complex64_t operator-(complex64_t a) { return {-a.real, -a.imag}; }
  friend bool operator==(complex64_t a, complex64_t b) {
    return a.real == b.real && a.imag == b.imag;
  }
  complex64_t& operator+=(complex64_t b) { return *this = *this + b; }
  complex64_t& operator*=(complex64_t b) { return *this = *this * b; }
};

template <typename U>
struct WorkPerThread {
  static_assert(sizeof(U) <= 8, "Type too large");
  static constexpr int n = 8 / sizeof(U);
};

// Limits<T>: max/min are +-inf for floating types, the numeric range for integers.
template <typename U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::min();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::min();
};
#define MTL_FLOAT_LIMITS(T)                                                  \
  template <>                                                                \
  struct Limits<T> {                                                         \
    static constexpr T max = metal::numeric_limits<T>::infinity();           \
    static constexpr T min = -metal::numeric_limits<T>::infinity();          \
    static constexpr T finite_max = metal::numeric_limits<T>::max();         \
    static constexpr T finite_min = metal::numeric_limits<T>::lowest();      \
  };
MTL_FLOAT_LIMITS(float)
MTL_FLOAT_LIMITS(half)
MTL_FLOAT_LIMITS(bfloat16_t)
#undef MTL_FLOAT_LIMITS
template <>
struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

// elem_to_loc: the memory offset of row-major element `elem` of an array with the given
// shape and (element) strides; the innermost dimension is the last one.
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int d = ndim - 1; d >= 0 && elem > 0; --d) {
    loc += static_cast<IdxT>(elem % shape[d]) * static_cast<IdxT>(strides[d]);
    elem /= shape[d];
  }
  return loc;
}
// 3-d grid position: x walks the last dimension, y the one before it, z all the others.
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(uint3 elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = static_cast<IdxT>(elem.x) * static_cast<IdxT>(strides[ndim - 1]);
  if (ndim > 1) loc += static_cast<IdxT>(elem.y) * static_cast<IdxT>(strides[ndim - 2]);
  IdxT rest = elem.z;
  for (int d = ndim - 3; d >= 0; --d) {
    loc += static_cast<IdxT>(rest % shape[d]) * static_cast<IdxT>(strides[d]);
    rest /= shape[d];
  }
  return loc;
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_1(uint elem, const int64_t& stride) {
  return static_cast<IdxT>(elem) * static_cast<IdxT>(stride);
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_2(uint2 elem, const int64_t strides[2]) {
  return static_cast<IdxT>(elem.x) * static_cast<IdxT>(strides[1]) +
         static_cast<IdxT>(elem.y) * static_cast<IdxT>(strides[0]);
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_3(uint3 elem, const int64_t strides[3]) {
  return static_cast<IdxT>(elem.x) * static_cast<IdxT>(strides[2]) +
         static_cast<IdxT>(elem.y) * static_cast<IdxT>(strides[1]) +
         static_cast<IdxT>(elem.z) * static_cast<IdxT>(strides[0]);
}

template <typename T, typename U>
inline T ceildiv(T N, U M) {
  return (N + M - 1) / M;
}

// log1p with the Goldberg correction (accurate for small x).
inline float log1p(float x) {
  float xp1 = 1.0f + x;
  if (xp1 == Limits<float>::max) return Limits<float>::max;
  if (xp1 == 1.0f) return x;
  return x * (metal::log(xp1) / (xp1 - 1.0f));
}
inline bfloat16_t log1p(bfloat16_t x) { return bfloat16_t(log1p(float(x))); }

template <typename U, typename T>
inline U cast_to(T v) {
  return static_cast<U>(v);
}

#endif  // MTL_SHIM_ABI_ONLY
