// ADALLAVA_CHECK(cond, message parts...): the project's input check for extension ops.
//
// It builds its message as TORCH_CHECK does (c10::str of the parts) but throws a
// std::runtime_error, which torch turns into a Python RuntimeError. TORCH_CHECK
// throws c10::Error, and on some builds (seen with torch 2.11.0+cu130 built by
// GCC 13.3) a c10::Error thrown from an extension's op cannot be caught: the
// process dies with a segmentation fault, so one bad call would take a serving
// process down. Standard exceptions cross into Python on every build seen.
#pragma once

#include <c10/util/StringUtil.h>

#include <stdexcept>

#define ADALLAVA_CHECK(cond, ...)                               \
  do {                                                          \
    if (!(cond)) {                                              \
      throw std::runtime_error(::c10::str(__VA_ARGS__));        \
    }                                                           \
  } while (false)
