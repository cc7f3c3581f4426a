// BAM_CHECK: TORCH_CHECK with its message built here, as one std::string, without std::ostream.
//
// On the GPU machine (its own torch 2.11 build, this extension built there by GCC 13.3;
// 2026-11-26) every TORCH_CHECK whose message streamed sizes, dtypes or numbers segfaulted
// while raising, where a check whose message held only strings raised cleanly. c10::str passes
// a single std::string through untouched, so these messages never reach a stream.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace bam_fused {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>,
                                       int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const at::Device& v) {
  s += c10::DeviceTypeName(v.type(), /*lower_case=*/true);  // (a std::string, no stream)
  if (v.has_index()) s += ":" + std::to_string(v.index());
}

}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace bam_fused

#define BAM_CHECK(cond, ...) TORCH_CHECK(cond, ::bam_fused::message(__VA_ARGS__))
