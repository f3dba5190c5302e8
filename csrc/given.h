// Whether an optional tensor argument of an op was passed: present and defined (the dispatcher
// may hand an op an undefined tensor for a None argument).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace rnnkernels {

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace rnnkernels
