// Host test of the cell math in cells.h: every backward function against central finite
// differences of its forward, in double precision, at random points. Exit code 1 on failure.
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "rnnkernels/cells.h"

using namespace rnnkernels;
using M = ScalarMath<double>;

namespace {

int failures = 0;
constexpr double kStep = 1e-6;
constexpr double kTol = 1e-6;

void expect_close(const char* what, double got, double want) {
  if (std::fabs(got - want) > kTol * (1.0 + std::fabs(want))) {
    std::printf("FAIL %s: analytic %.10g, numeric %.10g\n", what, got, want);
    ++failures;
  }
}

// d f / d x_k at x by central differences.
double numeric(const std::function<double(const std::vector<double>&)>& f, std::vector<double> x,
               size_t k) {
  const double x0 = x[k];
  x[k] = x0 + kStep;
  const double up = f(x);
  x[k] = x0 - kStep;
  const double down = f(x);
  return (up - down) / (2 * kStep);
}

void test_lstm(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  // x = (pi, pf, pg, po, c_prev); loss = a * h + b * c
  std::vector<double> x{n(rng), n(rng), n(rng), n(rng), n(rng)};
  const double a = n(rng), b = n(rng);
  auto loss = [&](const std::vector<double>& v) {
    double i, f, g, o, c, h;
    lstm_forward<double, M>(v[0], v[1], v[2], v[3], v[4], i, f, g, o, c, h);
    return a * h + b * c;
  };
  double i, f, g, o, c, h;
  lstm_forward<double, M>(x[0], x[1], x[2], x[3], x[4], i, f, g, o, c, h);
  double d[5];
  lstm_backward<double, M>(a, b, i, f, g, o, c, x[4], d[0], d[1], d[2], d[3], d[4]);
  const char* names[] = {"lstm di", "lstm df", "lstm dg", "lstm do", "lstm dc_prev"};
  for (size_t k = 0; k < 5; ++k) expect_close(names[k], d[k], numeric(loss, x, k));
}

void test_lstm_peephole(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  // x = (pi, pf, pg, po, c_prev, wi, wf, wo); loss = a * h + b * c
  std::vector<double> x(8);
  for (auto& v : x) v = n(rng);
  const double a = n(rng), b = n(rng);
  auto loss = [&](const std::vector<double>& v) {
    double i, f, g, o, c, h;
    lstm_peephole_forward<double, M>(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], i, f, g, o,
                                     c, h);
    return a * h + b * c;
  };
  double i, f, g, o, c, h;
  lstm_peephole_forward<double, M>(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], i, f, g, o, c,
                                   h);
  double d[5];
  lstm_peephole_backward<double, M>(a, b, i, f, g, o, c, x[4], x[5], x[6], x[7], d[0], d[1], d[2],
                                    d[3], d[4]);
  const char* names[] = {"peephole di", "peephole df", "peephole dg", "peephole do",
                         "peephole dc_prev"};
  for (size_t k = 0; k < 5; ++k) expect_close(names[k], d[k], numeric(loss, x, k));
  // the weight gradients the kernel sums: di * c_prev, df * c_prev, do * c
  expect_close("peephole dwi", d[0] * x[4], numeric(loss, x, 5));
  expect_close("peephole dwf", d[1] * x[4], numeric(loss, x, 6));
  expect_close("peephole dwo", d[3] * c, numeric(loss, x, 7));
}

void test_zoneout(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  std::uniform_real_distribution<double> u(0, 1);
  // x = (prev, next); loss = a * zoneout(d, prev, next), d a draw or a probability
  std::vector<double> x{n(rng), n(rng)};
  const double a = n(rng);
  for (double d : {0.0, 1.0, u(rng)}) {
    auto loss = [&](const std::vector<double>& v) { return a * zoneout_forward(d, v[0], v[1]); };
    double dnext, dprev;
    zoneout_backward(d, a, dnext, dprev);
    expect_close("zoneout dprev", dprev, numeric(loss, x, 0));
    expect_close("zoneout dnext", dnext, numeric(loss, x, 1));
  }
}

// A layer-normalised LSTM row of kUnits units, h = o * tanh(gamma * LN(c) + beta), composed of
// lstm_forward, lstm_gates_backward and layer_norm_backward as the CPU kernel composes them.
constexpr int kUnits = 4;

void test_lstm_layer_norm(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  // x = per unit (pi, pf, pg, po, c_prev); loss = sum a_j h_j + b_j c_j
  std::vector<double> x(5 * kUnits), a(kUnits), b(kUnits), gamma(kUnits), beta(kUnits);
  for (auto& v : x) v = n(rng);
  for (int j = 0; j < kUnits; ++j) {
    a[j] = n(rng), b[j] = n(rng), gamma[j] = 1 + 0.3 * n(rng), beta[j] = 0.3 * n(rng);
  }
  struct Row {
    double i[kUnits], f[kUnits], g[kUnits], o[kUnits], c[kUnits], xh[kUnits], tu[kUnits];
    double rstd;
  };
  auto forward = [&](const std::vector<double>& v, Row& r) {
    double mean = 0, var = 0, h;
    for (int j = 0; j < kUnits; ++j) {
      const double* u = &v[5 * j];
      lstm_forward<double, M>(u[0], u[1], u[2], u[3], u[4], r.i[j], r.f[j], r.g[j], r.o[j],
                              r.c[j], h);
      mean += r.c[j] / kUnits;
    }
    for (int j = 0; j < kUnits; ++j) var += (r.c[j] - mean) * (r.c[j] - mean) / kUnits;
    r.rstd = 1 / std::sqrt(var + 1e-5);
    double loss = 0;
    for (int j = 0; j < kUnits; ++j) {
      r.xh[j] = (r.c[j] - mean) * r.rstd;
      r.tu[j] = std::tanh(gamma[j] * r.xh[j] + beta[j]);
      loss += a[j] * r.o[j] * r.tu[j] + b[j] * r.c[j];
    }
    return loss;
  };
  auto loss = [&](const std::vector<double>& v) {
    Row r;
    return forward(v, r);
  };
  Row r;
  forward(x, r);
  double du[kUnits], m1 = 0, m2 = 0;
  for (int j = 0; j < kUnits; ++j) {
    du[j] = a[j] * r.o[j] * (1 - r.tu[j] * r.tu[j]);
    m1 += du[j] * gamma[j] / kUnits;
    m2 += du[j] * gamma[j] * r.xh[j] / kUnits;
  }
  for (int j = 0; j < kUnits; ++j) {
    const double dct = b[j] + layer_norm_backward(du[j] * gamma[j], r.xh[j], r.rstd, m1, m2);
    double d[5];
    lstm_gates_backward<double, M>(dct, r.i[j], r.f[j], r.g[j], x[5 * j + 4], d[0], d[1], d[2],
                                   d[4]);
    d[3] = a[j] * r.tu[j] * r.o[j] * (1 - r.o[j]);
    const char* names[] = {"ln lstm di", "ln lstm df", "ln lstm dg", "ln lstm do",
                           "ln lstm dc_prev"};
    for (int k = 0; k < 5; ++k) expect_close(names[k], d[k], numeric(loss, x, 5 * j + k));
  }
}

void test_gru(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  // x = (xr, xz, xn, hr, hz, hn, h_prev); loss = a * h
  std::vector<double> x(7);
  for (auto& v : x) v = n(rng);
  const double a = n(rng);
  auto loss = [&](const std::vector<double>& v) {
    double r, z, nn, h;
    gru_forward<double, M>(v[0], v[1], v[2], v[3], v[4], v[5], v[6], r, z, nn, h);
    return a * h;
  };
  double r, z, nn, h;
  gru_forward<double, M>(x[0], x[1], x[2], x[3], x[4], x[5], x[6], r, z, nn, h);
  double dxr, dxz, dxn, dhn, direct;
  gru_backward<double, M>(a, r, z, nn, x[5], x[6], dxr, dxz, dxn, dhn, direct);
  expect_close("gru dxr", dxr, numeric(loss, x, 0));
  expect_close("gru dxz", dxz, numeric(loss, x, 1));
  expect_close("gru dxn", dxn, numeric(loss, x, 2));
  expect_close("gru dhr", dxr, numeric(loss, x, 3));
  expect_close("gru dhz", dxz, numeric(loss, x, 4));
  expect_close("gru dhn", dhn, numeric(loss, x, 5));
  expect_close("gru dh_prev (direct)", direct, numeric(loss, x, 6));
}

void test_gru_reset_before(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  // One step with a scalar "matrix" w for the n row: hv = w * v. x = (xr, xz, xn, hr, hz, h_prev)
  std::vector<double> x(6);
  for (auto& v : x) v = n(rng);
  const double a = n(rng), w = n(rng);
  auto loss = [&](const std::vector<double>& v) {
    double r, z, vv, nn, h;
    gru_rb_forward_gates<double, M>(v[0], v[1], v[3], v[4], v[5], r, z, vv);
    gru_rb_forward_out<double, M>(v[2], w * vv, z, v[5], nn, h);
    return a * h;
  };
  double r, z, vv, nn, h;
  gru_rb_forward_gates<double, M>(x[0], x[1], x[3], x[4], x[5], r, z, vv);
  gru_rb_forward_out<double, M>(x[2], w * vv, z, x[5], nn, h);
  double dn, dz, direct, dr;
  gru_rb_backward_out<double, M>(a, z, nn, x[5], dn, dz, direct);
  gru_rb_backward_gates<double, M>(w * dn, r, x[5], dr, direct);
  expect_close("gru_rb dxr", dr, numeric(loss, x, 0));
  expect_close("gru_rb dxz", dz, numeric(loss, x, 1));
  expect_close("gru_rb dxn", dn, numeric(loss, x, 2));
  expect_close("gru_rb dh_prev", direct, numeric(loss, x, 5));
}

void test_rnn(std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  for (bool relu : {false, true}) {
    std::vector<double> x{n(rng)};
    if (relu && std::fabs(x[0]) < 1e-3) x[0] = 0.5;  // away from the kink
    const double a = n(rng);
    auto loss = [&](const std::vector<double>& v) { return a * rnn_forward<double, M>(v[0], relu); };
    const double h = rnn_forward<double, M>(x[0], relu);
    expect_close(relu ? "rnn relu" : "rnn tanh", rnn_backward<double, M>(a, h, relu),
                 numeric(loss, x, 0));
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 50; ++trial) {
    test_lstm(rng);
    test_lstm_peephole(rng);
    test_zoneout(rng);
    test_lstm_layer_norm(rng);
    test_gru(rng);
    test_gru_reset_before(rng);
    test_rnn(rng);
  }
  static_assert(num_gates(Cell::LSTM) == 4 && num_gates(Cell::GRU) == 3 &&
                num_gates(Cell::RNN_RELU) == 1, "gate counts");
  std::printf("%d passed, %d failed\n", failures == 0 ? 1 : 0, failures == 0 ? 0 : 1);
  return failures == 0 ? 0 : 1;
}
