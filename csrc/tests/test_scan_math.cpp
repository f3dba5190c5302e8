// Host test of the scan math that the CUDA kernels use (csrc/cuda/scan_math.h), in double: the
// nonlinearities against finite differences, and the selective scan's per-state backward step
// driving a serial backward over a whole sequence, whose every gradient (u, delta, A, B, C, D, z,
// delta_bias, initial state) is checked against central differences of the serial forward.
// The last line is "N passed, M failed".
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "check.h"
#include "scan_math.h"

using namespace rnnkernels::cuda;

namespace {

constexpr double kStep = 1e-6;
constexpr double kTol = 1e-6;

bool close(double got, double want) {
  return std::fabs(got - want) <= kTol * (1 + std::fabs(want));
}

double numeric(const std::function<double(double)>& f, double x) {
  return (f(x + kStep) - f(x - kStep)) / (2 * kStep);
}

void test_nonlinearities(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 3);
  for (int trial = 0; trial < 200; ++trial) {
    const double x = n(rng);
    std::snprintf(rk_test::context(), 256, "x=%g", x);
    CHECK(close(softplus_grad(x), numeric([](double v) { return softplus(v); }, x)));
    CHECK(close(silu_grad(x), numeric([](double v) { return silu(v); }, x)));
    CHECK(close(sigmoid(x), 1 / (1 + std::exp(-x))));
  }
  // torch's threshold: above 20 softplus is the identity.
  std::snprintf(rk_test::context(), 256, "softplus threshold");
  CHECK(softplus(25.0) == 25.0 && softplus_grad(25.0) == 1.0);
  CHECK(close(softplus(19.0), std::log1p(std::exp(19.0))));
}

void test_affine(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  for (int trial = 0; trial < 50; ++trial) {
    const Affine<double> f{n(rng), n(rng)}, g{n(rng), n(rng)}, k{n(rng), n(rng)};
    const double h = n(rng);
    std::snprintf(rk_test::context(), 256, "affine trial %d", trial);
    const Affine<double> fg = compose(f, g);
    CHECK(close(fg.a * h + fg.b, g.a * (f.a * h + f.b) + g.b));
    const Affine<double> left = compose(compose(f, g), k), right = compose(f, compose(g, k));
    CHECK(close(left.a, right.a) && close(left.b, right.b));
  }
}

// One channel of the selective scan with variable B, C (per step), every option on.
struct Scan {
  int L, N;
  bool softplus_on;
  std::vector<double> u, raw, z, A, B, C, x0;  // B, C: [t * N + n]
  double D, bias;
  std::vector<double> w, v;  // loss = sum_t w_t out_t + sum_n v_n x_{L-1, n}

  double delta(int t) const { return softplus_on ? softplus(raw[t] + bias) : raw[t] + bias; }

  // Returns the loss; states[t + 1] is the state after step t (states[0] = x0).
  double forward(std::vector<std::vector<double>>* states = nullptr) const {
    std::vector<double> x = x0;
    if (states) states->assign(1, x);
    double loss = 0;
    for (int t = 0; t < L; ++t) {
      const double dt = delta(t);
      double y = D * u[t];
      for (int n = 0; n < N; ++n) {
        x[n] = std::exp(dt * A[n]) * x[n] + dt * B[t * N + n] * u[t];
        y += C[t * N + n] * x[n];
      }
      if (states) states->push_back(x);
      loss += w[t] * y * silu(z[t]);
    }
    for (int n = 0; n < N; ++n) loss += v[n] * x[n];
    return loss;
  }
};

struct Grads {
  std::vector<double> u, raw, z, A, B, C, x0;
  double D = 0, bias = 0;
};

// The serial backward from selective_state_backward, as the kernel runs it per state.
Grads backward(const Scan& s) {
  std::vector<std::vector<double>> xs;
  s.forward(&xs);
  Grads g;
  g.u.assign(s.L, 0);
  g.raw.assign(s.L, 0);
  g.z.assign(s.L, 0);
  g.A.assign(s.N, 0);
  g.B.assign(s.L * s.N, 0);
  g.C.assign(s.L * s.N, 0);
  std::vector<double> carry = s.v;
  for (int t = s.L - 1; t >= 0; --t) {
    const double dt = s.delta(t);
    double y = s.D * s.u[t];
    for (int n = 0; n < s.N; ++n) y += s.C[t * s.N + n] * xs[t + 1][n];
    const double dy = s.w[t] * silu(s.z[t]);
    g.z[t] = s.w[t] * y * silu_grad(s.z[t]);
    double ddt = 0, du = 0;
    for (int n = 0; n < s.N; ++n) {
      const double a = std::exp(dt * s.A[n]);
      selective_state_backward(xs[t][n], xs[t + 1][n], a, dt, s.u[t], s.A[n], s.B[t * s.N + n],
                               s.C[t * s.N + n], dy, carry[n], ddt, du, g.A[n], g.B[t * s.N + n],
                               g.C[t * s.N + n]);
    }
    g.u[t] = du + dy * s.D;
    g.D += dy * s.u[t];
    const double draw = s.softplus_on ? ddt * softplus_grad(s.raw[t] + s.bias) : ddt;
    g.raw[t] = draw;
    g.bias += draw;
  }
  g.x0 = carry;
  return g;
}

void check_grad(Scan s, std::vector<double> Scan::*field, const std::vector<double>& grad,
                const char* name) {
  for (size_t i = 0; i < grad.size(); ++i) {
    const double keep = (s.*field)[i];
    auto loss = [&](double val) {
      (s.*field)[i] = val;
      const double l = s.forward();
      (s.*field)[i] = keep;
      return l;
    };
    std::snprintf(rk_test::context(), 256, "d%s[%zu] softplus=%d", name, i, s.softplus_on);
    CHECK(close(grad[i], numeric(loss, keep)));
  }
}

void check_scalar(Scan s, double Scan::*field, double grad, const char* name) {
  const double keep = s.*field;
  auto loss = [&](double val) {
    s.*field = val;
    const double l = s.forward();
    s.*field = keep;
    return l;
  };
  std::snprintf(rk_test::context(), 256, "d%s softplus=%d", name, s.softplus_on);
  CHECK(close(grad, numeric(loss, keep)));
}

void test_selective_scan(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  std::uniform_real_distribution<double> pos(0.5, 1.5);
  for (bool softplus_on : {false, true}) {
    Scan s;
    s.L = 7;
    s.N = 3;
    s.softplus_on = softplus_on;
    auto fill = [&](std::vector<double>& v, size_t size) {
      v.resize(size);
      for (auto& e : v) e = n(rng);
    };
    fill(s.u, s.L);
    fill(s.z, s.L);
    fill(s.B, s.L * s.N);
    fill(s.C, s.L * s.N);
    fill(s.x0, s.N);
    fill(s.w, s.L);
    fill(s.v, s.N);
    s.raw.resize(s.L);
    for (auto& e : s.raw) e = softplus_on ? n(rng) : 0.1 * pos(rng);  // delta > 0 without softplus
    s.A.resize(s.N);
    for (auto& e : s.A) e = -pos(rng);
    s.D = n(rng);
    s.bias = 0.3 * n(rng);
    const Grads g = backward(s);
    check_grad(s, &Scan::u, g.u, "u");
    check_grad(s, &Scan::raw, g.raw, "delta");
    check_grad(s, &Scan::z, g.z, "z");
    check_grad(s, &Scan::A, g.A, "A");
    check_grad(s, &Scan::B, g.B, "B");
    check_grad(s, &Scan::C, g.C, "C");
    check_grad(s, &Scan::x0, g.x0, "initial_state");
    check_scalar(s, &Scan::D, g.D, "D");
    check_scalar(s, &Scan::bias, g.bias, "delta_bias");
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_nonlinearities(rng);
  test_affine(rng);
  test_selective_scan(rng);
  return rk_test::finish();
}
