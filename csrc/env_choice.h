// The extension's own environment variables (README, "Environment variables"), read on every
// call so that tests and benchmarks can compare the choices in one process.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "check.h"

namespace bam_fused {

// The value of variable `name`, case and surrounding spaces ignored (as bam_fused/env.py's
// choice, which reads some of the same variables): "auto" when unset or empty, else one of
// `choices` ("auto" first among them, all lower case); anything else raises an error that
// names the variable and the choices.
inline std::string env_choice(const char* name, std::initializer_list<const char*> choices) {
  const char* raw = std::getenv(name);
  std::string v = raw == nullptr ? "" : raw;
  const auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  v.erase(std::find_if_not(v.rbegin(), v.rend(), space).base(), v.end());
  v.erase(v.begin(), std::find_if_not(v.begin(), v.end(), space));
  std::transform(v.begin(), v.end(), v.begin(), [](char c) { return std::tolower(static_cast<unsigned char>(c)); });
  if (v.empty()) v = "auto";
  std::string allowed;
  size_t i = 0;
  for (const char* c : choices) {
    if (v == c) return v;
    if (i > 0) allowed += i + 1 == choices.size() ? " or " : ", ";
    allowed += c;
    ++i;
  }
  BAM_CHECK(false, "environment variable ", name, " must be ", allowed, ", got '", v, "'");
  return v;
}

}  // namespace bam_fused
