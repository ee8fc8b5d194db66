// The fused elementwise step of PISA / SISA / NSISA on CPU (pisa/cpu_kernel.py builds and loads
// it; the math and the coefficient slots are those of pisa/fused.py):
//
//   s   = d [+ pi] [+ kc * w]
//   v   = beta * v + ((1 - beta) * s) * s             (second moment)
//   e   = s / (sqrt(v) + qshift) | s / (|s| + qshift) | s   [+ kdk * w]
//   tgt = (tgt + a_pi * pi) + a_e * e                  (tgt = w when updated in place)
//   pi  = pi + a_dual * e
//   returns sum(e^2) in double when tracking
//
// One loop per tensor that reads and writes each array once, with the coefficients in registers
// (inductor's loop reloads them at every vector, as its vector stores may alias them). Every
// variant is its own instantiation, so the loops carry no branches.
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>

namespace {

enum : int { IDENTITY = 0, SECOND_MOMENT = 1, ABS = 2 };
enum : int { DUAL = 1, COUPLED = 2, DECOUPLED = 4, TARGET = 8, TRACK = 16, N_FLAGS = 32 };
enum : int { KC, BETA, ONE_MINUS_BETA, QSHIFT, KDK, A_PI, A_E, A_DUAL };

template <typename T>
using Update = double (*)(T*, const T*, T*, T*, T*, int64_t, const double*, int);

// elements per block: the unit of work a thread takes
constexpr int64_t BLOCK = 2048;

template <typename T, int P, int F>
double update_block(T* __restrict w, const T* __restrict d, T* __restrict pi, T* __restrict v,
                    T* __restrict tgt, int64_t n, const double* c) {
  constexpr bool dual = F & DUAL, coupled = F & COUPLED, decoupled = F & DECOUPLED;
  constexpr bool target = F & TARGET, track = F & TRACK;
  const T kc = T(c[KC]), beta = T(c[BETA]), omb = T(c[ONE_MINUS_BETA]), qshift = T(c[QSHIFT]);
  const T kdk = T(c[KDK]), a_pi = T(c[A_PI]), a_e = T(c[A_E]), a_dual = T(c[A_DUAL]);
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; i++) {
    const T p0 = pi[i];
    const T w0 = (!target || coupled || decoupled) ? w[i] : T(0);
    T s = d[i];
    if constexpr (dual) s = s + p0;
    if constexpr (coupled) s = s + kc * w0;
    T e = s;
    if constexpr (P == SECOND_MOMENT) {
      const T v1 = v[i] * beta + (omb * s) * s;
      v[i] = v1;
      e = s / (std::sqrt(v1) + qshift);
    } else if constexpr (P == ABS) {
      e = s / (std::abs(s) + qshift);
    }
    if constexpr (decoupled) e = e + kdk * w0;
    if constexpr (target) {
      tgt[i] = (tgt[i] + a_pi * p0) + a_e * e;
    } else {
      w[i] = (w0 + a_pi * p0) + a_e * e;
    }
    pi[i] = p0 + a_dual * e;
    if constexpr (track) acc += double(e) * double(e);
  }
  return acc;
}

template <typename T, int P, int F>
double update(T* w, const T* d, T* pi, T* v, T* tgt, int64_t n, const double* c, int threads) {
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  double acc = 0.0;
#pragma omp parallel for reduction(+ : acc) num_threads(threads) schedule(static) \
    if (threads > 1 && blocks > 1)
  for (int64_t b = 0; b < blocks; b++) {
    const int64_t lo = b * BLOCK, len = (n - lo < BLOCK) ? n - lo : BLOCK;
    acc += update_block<T, P, F>(w + lo, d + lo, pi + lo, v ? v + lo : nullptr,
                                 tgt ? tgt + lo : nullptr, len, c);
  }
  return acc;
}

template <typename T, int... I>
constexpr std::array<Update<T>, sizeof...(I)> table(std::integer_sequence<int, I...>) {
  return {&update<T, I / N_FLAGS, I % N_FLAGS>...};
}

template <typename T>
double run(int64_t k, T** w, T** d, T** pi, T** v, T** tgt, const int64_t* n, const double* c,
           int precond, int flags, int threads) {
  static constexpr auto fns = table<T>(std::make_integer_sequence<int, 3 * N_FLAGS>{});
  const Update<T> fn = fns[precond * N_FLAGS + flags];
  double acc = 0.0;
  for (int64_t j = 0; j < k; j++) {
    // a small tensor is not worth waking the threads for
    const int nt = n[j] < 16 * BLOCK ? 1 : threads;
    acc += fn(w[j], d[j], pi[j], v ? v[j] : nullptr, tgt ? tgt[j] : nullptr, n[j], c, nt);
  }
  return acc;
}

}  // namespace

extern "C" {

// k tensors; v: nullptr unless second moment; tgt: nullptr when updated in place
double pisa_admm_f32(int64_t k, float** w, float** d, float** pi, float** v, float** tgt,
                     const int64_t* n, const double* c, int precond, int flags, int threads) {
  return run<float>(k, w, d, pi, v, tgt, n, c, precond, flags, threads);
}

double pisa_admm_f64(int64_t k, double** w, double** d, double** pi, double** v, double** tgt,
                     const int64_t* n, const double* c, int precond, int flags, int threads) {
  return run<double>(k, w, d, pi, v, tgt, n, c, precond, flags, threads);
}

}  // extern "C"
