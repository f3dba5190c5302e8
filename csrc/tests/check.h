// A minimal check counter for the host ctests: CHECK records a pass or prints the failure with
// the current context, and finish() prints "N passed, M failed" as the last line and gives the
// exit code.
#pragma once

#include <cstdio>

namespace rk_test {

inline int& passed() {
  static int n = 0;
  return n;
}

inline int& failed() {
  static int n = 0;
  return n;
}

// Description of the case under test, printed with every failure (set with std::snprintf).
inline char* context() {
  static char text[256] = "";
  return text;
}

inline void check(bool ok, const char* what, const char* file, int line) {
  if (ok) {
    ++passed();
  } else {
    ++failed();
    std::printf("FAIL %s:%d: %s [%s]\n", file, line, what, context());
  }
}

inline int finish() {
  std::printf("%d passed, %d failed\n", passed(), failed());
  return failed() == 0 ? 0 : 1;
}

}  // namespace rk_test

#define CHECK(cond) rk_test::check((cond), #cond, __FILE__, __LINE__)
