// Native tests of the nhgd_ext operators (the CPU kernels of the C++ core),
// built by CMakeLists.txt and run by ctest. No test framework: each test is a
// function; EXPECT records a failure and carries on; main returns nonzero if
// anything failed.
//
// The operators are called through the dispatcher's boxed interface, as the
// Python side does, so these tests see exactly the registered schemas. Boxed
// calls need every argument, so trailing arguments we leave out are filled
// from the schema's defaults.
//
// Every reference is computed from first principles in float64 (a direct
// inverse of the updated matrix), never from the update formula itself.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace {

int g_failures = 0;
int g_checks = 0;
const char* g_current = "";

#define EXPECT(cond, ...)                                                              \
  do {                                                                                \
    ++g_checks;                                                                       \
    if (!(cond)) {                                                                    \
      ++g_failures;                                                                   \
      std::fprintf(stderr, "FAIL [%s] %s:%d: %s  %s\n", g_current, __FILE__, __LINE__, \
                   #cond, std::string(c10::str(__VA_ARGS__)).c_str());                          \
    }                                                                                 \
  } while (0)

using Stack = std::vector<c10::IValue>;

// Calls nhgd_ext::<name>.<overload> with `args`, the rest taken from defaults.
Stack call(const char* name, const char* overload, Stack args) {
  const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow((std::string("nhgd_ext::") + name).c_str(), overload);
  const auto& params = op.schema().arguments();
  TORCH_CHECK(args.size() <= params.size(), "test: too many arguments for ", op.schema());
  for (size_t i = args.size(); i < params.size(); ++i) {
    TORCH_CHECK(params[i].default_value().has_value(), "test: argument '", params[i].name(),
                "' of ", op.schema(), " has no default");
    args.push_back(*params[i].default_value());
  }
  op.callBoxed(&args);
  return args;
}

c10::IValue list(const std::vector<at::Tensor>& ts) {
  c10::List<at::Tensor> l;
  for (const auto& t : ts) l.push_back(t);
  return c10::IValue(l);
}

at::TensorOptions f64() { return at::TensorOptions().dtype(at::kDouble); }

// A random symmetric positive definite d x d matrix, well conditioned.
at::Tensor random_spd(int64_t d) {
  const auto X = at::randn({d, d}, f64());
  return X.matmul(X.mT()) / static_cast<double>(d) + at::eye(d, f64());
}

// at::linalg_inv returns a column-major (non-contiguous) result, and the
// state tensors the operators update in place must be contiguous.
// Full-mode updates keep A exactly symmetric when it was, so the inverse is
// made bitwise symmetric by mirroring its lower triangle.
at::Tensor inv(const at::Tensor& M) {
  const auto A = at::linalg_inv(M);
  return (at::tril(A) + at::tril(A, -1).mT()).contiguous();
}

double rel_err(const at::Tensor& actual, const at::Tensor& expected) {
  const double scale = std::max(expected.abs().max().item<double>(), 1e-300);
  return (actual - expected).abs().max().item<double>() / scale;
}

bool exactly_symmetric(const at::Tensor& A) { return at::equal(A, A.mT().contiguous()); }

// Expects a c10::ValueError whose message names `op` and `arg`, and `state`
// bit-for-bit unchanged afterwards.
void expect_value_error(const std::string& what, const std::function<void()>& fn,
                        const std::vector<at::Tensor>& state, const char* op, const char* arg) {
  std::vector<at::Tensor> before;
  for (const auto& t : state) before.push_back(t.clone());
  bool thrown = false;
  try {
    fn();
  } catch (const c10::ValueError& e) {
    thrown = true;
    const std::string msg = e.what_without_backtrace();
    EXPECT(msg.find(op) != std::string::npos, what, ": message does not name the op: ", msg);
    EXPECT(msg.find(std::string("'") + arg + "'") != std::string::npos, what,
          ": message does not name argument '", arg, "': ", msg);
  } catch (const c10::Error& e) {
    EXPECT(false, what, ": expected c10::ValueError, got c10::Error: ", e.what_without_backtrace());
    thrown = true;
  } catch (const std::exception& e) {
    EXPECT(false, what, ": expected c10::ValueError, got another exception: ", e.what());
    thrown = true;
  }
  EXPECT(thrown, what, ": no exception");
  for (size_t i = 0; i < state.size(); ++i) {
    EXPECT(at::equal(state[i], before[i]), what, ": state tensor ", i, " was modified");
  }
}

// ---------------------------------------------------------------------------

void test_schemas() {
  const char* names[][2] = {
      {"sherman_morrison_", ""}, {"sherman_morrison_", "tensor"}, {"woodbury_", ""},
      {"woodbury_", "tensor"},   {"kfac_update_", ""},            {"kfac_update_", "tensor"},
      {"kfac_apply", ""},        {"running_average_", ""},        {"running_average_", "tensor"},
      {"symmetrize_", ""},       {"_compiled_with_cuda", ""},  {"sherman_morrison_deferred_", ""},
      {"apply_pending_", ""},
  };
  for (const auto& n : names) {
    const auto op = c10::Dispatcher::singleton().findSchema(
        {std::string("nhgd_ext::") + n[0], n[1]});
    EXPECT(op.has_value(), "operator nhgd_ext::", n[0], ".", n[1], " is not registered");
  }
  // The CMake core has no CUDA sources.
  const auto out = call("_compiled_with_cuda", "", {});
  EXPECT(out.size() == 1 && out[0].isBool() && !out[0].toBool(), "_compiled_with_cuda() != false");
}

void test_sherman_morrison() {
  for (int64_t d : {1, 7, 33}) {
    const auto M = random_spd(d);
    const auto g = at::randn({d}, f64());
    for (auto [a, b] : {std::pair{0.9, 0.1}, std::pair{4.0 / 5.0, 1.0 / 5.0}, std::pair{2.5, 0.0}}) {
      auto A = inv(M);
      call("sherman_morrison_", "", {A, g, a, b});
      const auto expected = inv(a * M + b * at::outer(g, g));
      EXPECT(rel_err(A, expected) < 1e-10, "d=", d, " a=", a, " b=", b, " rel err ", rel_err(A, expected));
      EXPECT(exactly_symmetric(A), "d=", d, ": result not exactly symmetric");

      // Tensor overload with 0-d host tensors: same numbers.
      auto A2 = inv(M);
      call("sherman_morrison_", "tensor",
           {A2, g, at::scalar_tensor(a, f64()), at::scalar_tensor(b, at::TensorOptions().dtype(at::kFloat))});
      EXPECT(rel_err(A2, expected) < 1e-6, "tensor overload d=", d, " rel err ", rel_err(A2, expected));
    }
  }
}

void test_sherman_morrison_lower_triangle() {
  // u = A g reads only the lower triangle: garbage in the strict upper one
  // leaves the lower triangle of the result as in a clean run. With
  // lower_only=true the upper triangle is not written at all, and
  // symmetrize_ then gives exactly the full-mode result.
  const int64_t d = 9;
  const auto M = random_spd(d);
  const auto g = at::randn({d}, f64());
  const auto clean = inv(M);
  call("sherman_morrison_", "", {clean, g, 0.7, 0.3});
  const auto expected = inv(0.7 * M + 0.3 * at::outer(g, g));
  EXPECT(rel_err(clean, expected) < 1e-10, "rel err ", rel_err(clean, expected));

  const auto garbage = at::triu(at::full({d, d}, 1e3, f64()), 1);
  auto full = inv(M) + garbage;
  call("sherman_morrison_", "", {full, g, 0.7, 0.3});
  EXPECT(at::equal(at::tril(full), at::tril(clean)), "full mode: the upper triangle was read");

  auto lower = inv(M) + garbage;
  const auto stale = at::triu(lower, 1);
  call("sherman_morrison_", "", {lower, g, 0.7, 0.3, c10::IValue(), true});
  EXPECT(at::equal(at::triu(lower, 1), stale), "lower_only: the upper triangle was written");
  EXPECT(at::equal(at::tril(lower), at::tril(clean)), "lower_only: lower triangle differs");
  call("symmetrize_", "", {lower});
  EXPECT(at::equal(lower, clean), "lower_only + symmetrize_ != full mode");
}

void test_sherman_morrison_batched() {
  const int64_t n = 4, d = 7;
  std::vector<at::Tensor> Ms;
  for (int64_t i = 0; i < n; ++i) Ms.push_back(random_spd(d));
  const auto M = at::stack(Ms);
  const auto g = at::randn({n, d}, f64());
  auto A = inv(M);
  call("sherman_morrison_", "", {A, g, 0.95, 0.05});
  for (int64_t i = 0; i < n; ++i) {
    const auto expected = inv(0.95 * M[i] + 0.05 * at::outer(g[i], g[i]));
    EXPECT(rel_err(A[i], expected) < 1e-10, "batch ", i, " rel err ", rel_err(A[i], expected));
  }
  EXPECT(exactly_symmetric(A), "batched result not exactly symmetric");
}

void test_sherman_morrison_bad_denominator() {
  // A = -I is not positive definite: 1 + s q = 1 - 1 = 0 -> error, A unchanged.
  const int64_t d = 3;
  auto A = -at::eye(d, f64());
  const auto before = A.clone();
  auto g = at::zeros({d}, f64());
  g[0] = 1.0;
  bool thrown = false;
  try {
    call("sherman_morrison_", "", {A, g, 1.0, 1.0});
  } catch (const c10::Error&) {
    thrown = true;
  }
  EXPECT(thrown, "non-positive denominator did not raise");
  EXPECT(at::equal(A, before), "A modified by a failed update");
}

void test_woodbury() {
  for (int64_t d : {1, 7, 33}) {
    for (int64_t k : {1, 3, 8}) {
      const auto M = random_spd(d);
      const auto H = at::randn({k, d}, f64());
      const double a = 0.8;
      auto A = inv(M);
      call("woodbury_", "", {A, H, a});
      const auto expected = inv(a * M + H.mT().matmul(H));
      EXPECT(rel_err(A, expected) < 1e-10, "d=", d, " k=", k, " rel err ", rel_err(A, expected));
      EXPECT(exactly_symmetric(A), "d=", d, " k=", k, ": result not exactly symmetric");

      auto A2 = inv(M);
      call("woodbury_", "tensor", {A2, H, at::scalar_tensor(a, f64())});
      EXPECT(at::equal(A2, A), "tensor overload differs from float overload, d=", d, " k=", k);
    }
  }
  // Batched, and H not contiguous.
  const int64_t n = 3, d = 6, k = 2;
  std::vector<at::Tensor> Ms;
  for (int64_t i = 0; i < n; ++i) Ms.push_back(random_spd(d));
  const auto M = at::stack(Ms);
  const auto H = at::randn({n, d, k}, f64()).transpose(1, 2);
  auto A = inv(M);
  call("woodbury_", "", {A, H, 1.5});
  for (int64_t i = 0; i < n; ++i) {
    const auto expected = inv(1.5 * M[i] + H[i].mT().matmul(H[i]));
    EXPECT(rel_err(A[i], expected) < 1e-10, "batched woodbury ", i, " rel err ", rel_err(A[i], expected));
  }
}

void test_ema_steps_equal_one_woodbury_step() {
  const int64_t d = 12, k = 5;
  const double beta = 0.9;
  const auto M = random_spd(d);
  const auto G = at::randn({k, d}, f64());  // rows g_1..g_k, applied in this order

  auto seq = inv(M);
  for (int64_t i = 0; i < k; ++i) call("sherman_morrison_", "", {seq, G[i], beta, 1.0 - beta});

  // Row i (1-based) scaled by sqrt((1 - beta) * beta^(k - i)); a = beta^k.
  std::vector<double> w;
  for (int64_t i = 1; i <= k; ++i) w.push_back(std::sqrt((1.0 - beta) * std::pow(beta, double(k - i))));
  const auto H = G * at::tensor(w, f64()).unsqueeze(1);
  auto one = inv(M);
  call("woodbury_", "", {one, H, std::pow(beta, double(k))});

  auto Mk = M.clone();
  for (int64_t i = 0; i < k; ++i) Mk = beta * Mk + (1.0 - beta) * at::outer(G[i], G[i]);
  const auto expected = inv(Mk);
  EXPECT(rel_err(seq, expected) < 1e-10, "sequential EMA rel err ", rel_err(seq, expected));
  EXPECT(rel_err(one, expected) < 1e-10, "rank-k step rel err ", rel_err(one, expected));
  EXPECT(rel_err(one, seq) < 1e-10, "rank-k step != k rank-one steps: ", rel_err(one, seq));
}

void test_running_average() {
  auto L = at::randn({3, 4, 5}, f64());
  const auto B = at::randn({3, 5, 4}, f64()).transpose(1, 2);  // non-contiguous B
  const auto L0 = L.clone();
  const double a = 3.0 / 4.0, b = 1.0 / 4.0;  // running-average coefficients after n = 3
  call("running_average_", "", {L, B, a, b});
  EXPECT(rel_err(L, a * L0 + b * B) < 1e-14, "rel err ", rel_err(L, a * L0 + b * B));

  auto L2 = L0.clone();
  call("running_average_", "tensor", {L2, B, at::scalar_tensor(a, f64()), at::scalar_tensor(b, f64())});
  EXPECT(at::equal(L2, L), "tensor overload differs from float overload");
}

void test_kfac() {
  struct Layer { int64_t d_in, d_out, n, m; };
  const std::vector<Layer> layers = {{5, 3, 4, 4}, {8, 2, 6, 9}, {1, 1, 2, 3}};
  const double a = 0.9, b = 0.1;
  std::vector<at::Tensor> S, G, S_inv, G_inv, acts, grads, V;
  for (const auto& l : layers) {
    S.push_back(random_spd(l.d_in));
    G.push_back(random_spd(l.d_out));
    S_inv.push_back(inv(S.back()));
    G_inv.push_back(inv(G.back()));
    acts.push_back(at::randn({l.n, l.d_in}, f64()));
    grads.push_back(at::randn({l.m, l.d_out}, f64()));
    V.push_back(at::randn({l.d_out, l.d_in}, f64()));
  }
  call("kfac_update_", "", {list(S_inv), list(G_inv), list(acts), list(grads), a, b});
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto eS = inv(a * S[i] + (b / double(layers[i].n)) * acts[i].mT().matmul(acts[i]));
    const auto eG = inv(a * G[i] + (b / double(layers[i].m)) * grads[i].mT().matmul(grads[i]));
    EXPECT(rel_err(S_inv[i], eS) < 1e-10, "layer ", i, " S_inv rel err ", rel_err(S_inv[i], eS));
    EXPECT(rel_err(G_inv[i], eG) < 1e-10, "layer ", i, " G_inv rel err ", rel_err(G_inv[i], eG));
    EXPECT(exactly_symmetric(S_inv[i]) && exactly_symmetric(G_inv[i]), "layer ", i, " not symmetric");
  }

  const auto out = call("kfac_apply", "", {list(S_inv), list(G_inv), list(V)});
  EXPECT(out.size() == 1 && out[0].isTensorList(), "kfac_apply did not return a Tensor[]");
  if (out.size() == 1 && out[0].isTensorList()) {
    const auto res = out[0].toTensorVector();
    EXPECT(res.size() == layers.size(), "kfac_apply returned ", res.size(), " tensors");
    for (size_t i = 0; i < res.size() && i < layers.size(); ++i) {
      const auto expected = G_inv[i].matmul(V[i]).matmul(S_inv[i]);
      EXPECT(rel_err(res[i], expected) < 1e-12, "kfac_apply layer ", i, " rel err ", rel_err(res[i], expected));
    }
  }
}

void test_bad_arguments() {
  const int64_t d = 7;
  const auto M = random_spd(d);
  auto A = inv(M);
  const auto g = at::randn({d}, f64());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const char* sm = "sherman_morrison_";

  expect_value_error("a = -1", [&] { call(sm, "", {A, g, -1.0, 0.5}); }, {A}, sm, "a");
  expect_value_error("a = 0", [&] { call(sm, "", {A, g, 0.0, 0.5}); }, {A}, sm, "a");
  expect_value_error("a = nan", [&] { call(sm, "", {A, g, nan, 0.5}); }, {A}, sm, "a");
  expect_value_error("b = -1", [&] { call(sm, "", {A, g, 0.5, -1.0}); }, {A}, sm, "b");
  expect_value_error("b = inf", [&] { call(sm, "", {A, g, 0.5, inf}); }, {A}, sm, "b");
  expect_value_error("0-d a = -1", [&] {
    call(sm, "tensor", {A, g, at::scalar_tensor(-1.0, f64()), at::scalar_tensor(0.5, f64())});
  }, {A}, sm, "a");
  expect_value_error("g of size d+1", [&] { call(sm, "", {A, at::randn({d + 1}, f64()), 0.9, 0.1}); },
                     {A}, sm, "g");
  expect_value_error("g float32", [&] { call(sm, "", {A, g.to(at::kFloat), 0.9, 0.1}); }, {A}, sm, "g");
  expect_value_error("g int64", [&] { call(sm, "", {A, at::ones({d}, at::kLong), 0.9, 0.1}); }, {A}, sm,
                     "g");
  expect_value_error("g with nan", [&] {
    auto bad = g.clone();
    bad[3] = nan;
    call(sm, "", {A, bad, 0.9, 0.1});
  }, {A}, sm, "g");
  expect_value_error("A int32", [&] {
    call(sm, "", {at::ones({d, d}, at::kInt), at::ones({d}, at::kInt), 0.9, 0.1});
  }, {A}, sm, "A");
  auto R = at::randn({d, d + 1}, f64());
  expect_value_error("A not square", [&] { call(sm, "", {R, g, 0.9, 0.1}); }, {R}, sm, "A");
  auto T = inv(M).mT();  // transposed view: non-contiguous state
  expect_value_error("A not contiguous", [&] { call(sm, "", {T, g, 0.9, 0.1}); }, {T}, sm, "A");
  auto Ab = at::stack({A, A});
  expect_value_error("batched g with the wrong batch", [&] {
    call(sm, "", {Ab, at::randn({3, d}, f64()), 0.9, 0.1});
  }, {Ab}, sm, "g");
  expect_value_error("status of the wrong dtype", [&] {
    call(sm, "", {A, g, 0.9, 0.1, at::zeros({1}, at::kLong)});
  }, {A}, sm, "status");

  const char* wb = "woodbury_";
  expect_value_error("woodbury H of width d+1", [&] { call(wb, "", {A, at::randn({2, d + 1}, f64()), 0.9}); },
                     {A}, wb, "H");
  expect_value_error("woodbury a = -1", [&] { call(wb, "", {A, at::randn({2, d}, f64()), -1.0}); }, {A}, wb,
                     "a");
  expect_value_error("woodbury H with inf", [&] {
    auto H = at::randn({2, d}, f64());
    H[1][2] = inf;
    call(wb, "", {A, H, 0.9});
  }, {A}, wb, "H");

  const char* ra = "running_average_";
  auto L = at::randn({4, 5}, f64());
  expect_value_error("running_average_ B of another shape", [&] {
    call(ra, "", {L, at::randn({5, 4}, f64()), 0.5, 0.5});
  }, {L}, ra, "B");
  expect_value_error("running_average_ b = -1", [&] { call(ra, "", {L, at::randn({4, 5}, f64()), 0.5, -1.0}); },
                     {L}, ra, "b");

  const char* kf = "kfac_update_";
  auto S1 = inv(random_spd(3)), G1 = inv(random_spd(2));
  auto S2 = inv(random_spd(4)), G2 = inv(random_spd(5));
  const auto a1 = at::randn({6, 3}, f64()), r1 = at::randn({6, 2}, f64());
  expect_value_error("kfac_update_ lists of different lengths", [&] {
    call(kf, "", {list({S1, S2}), list({G1}), list({a1, a1}), list({r1, r1}), 0.9, 0.1});
  }, {S1, S2, G1}, kf, "G_inv");
  expect_value_error("kfac_update_ acts of the wrong width", [&] {
    call(kf, "", {list({S1, S2}), list({G1, G2}), list({a1, at::randn({6, 7}, f64())}),
                  list({r1, at::randn({6, 5}, f64())}), 0.9, 0.1});
  }, {S1, S2, G1, G2}, kf, "acts");
}

}  // namespace

// The deferred form: after apply_pending_, the pair (A, pending) equals the
// direct inverse of the accumulated M, for running-average coefficients.
void test_sherman_morrison_deferred() {
  for (int64_t d : {1, 7, 33}) {
    auto M = random_spd(d);
    auto A = inv(M);
    auto pending = at::zeros({d + 2}, f64());
    pending[0] = 1.0;
    for (int n = 1; n <= 4; ++n) {
      const double a = n / (n + 1.0), b = 1.0 / (n + 1.0);
      const auto g = at::randn({d}, f64());
      call("sherman_morrison_deferred_", "", {A, pending, g, a, b});
      M = a * M + b * at::outer(g, g);
    }
    call("apply_pending_", "", {A, pending});
    const auto expected = inv(M);
    EXPECT(rel_err(A, expected) < 1e-10, "d=", d, " rel err ", rel_err(A, expected));
    EXPECT(exactly_symmetric(A), "d=", d, ": result not exactly symmetric");
    EXPECT(pending[0].item<double>() == 1.0 && pending[1].item<double>() == 0.0, "d=", d,
           ": apply_pending_ must leave nothing pending");
  }
}

int main() {
  at::manual_seed(1234);
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"schemas", test_schemas},
      {"sherman_morrison", test_sherman_morrison},
      {"sherman_morrison_lower_triangle", test_sherman_morrison_lower_triangle},
      {"sherman_morrison_batched", test_sherman_morrison_batched},
      {"sherman_morrison_bad_denominator", test_sherman_morrison_bad_denominator},
      {"sherman_morrison_deferred", test_sherman_morrison_deferred},
      {"woodbury", test_woodbury},
      {"ema_steps_equal_one_woodbury_step", test_ema_steps_equal_one_woodbury_step},
      {"running_average", test_running_average},
      {"kfac", test_kfac},
      {"bad_arguments", test_bad_arguments},
  };
  for (const auto& [name, fn] : tests) {
    g_current = name;
    const int before = g_failures;
    try {
      fn();
    } catch (const c10::Error& e) {
      ++g_failures;
      std::fprintf(stderr, "FAIL [%s] unexpected exception: %s\n", name, e.what_without_backtrace());
    } catch (const std::exception& e) {
      ++g_failures;
      std::fprintf(stderr, "FAIL [%s] unexpected exception: %s\n", name, e.what());
    }
    std::printf("%-40s %s\n", name, g_failures == before ? "ok" : "FAILED");
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
