// The extension's own environment variables (README, "Environment variables"), read on every
// call so that tests and benchmarks can compare the choices in one process.
#pragma once

#include <cstdlib>
#include <initializer_list>
#include <string>

#include "check.h"

namespace bam_fused {

// The value of variable `name`: "auto" when unset or empty, else one of `choices` ("auto"
// first among them); anything else raises an error that names the variable and the choices.
inline std::string env_choice(const char* name, std::initializer_list<const char*> choices) {
  const char* raw = std::getenv(name);
  const std::string v = raw == nullptr || *raw == '\0' ? "auto" : raw;
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
