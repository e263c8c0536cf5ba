// ADALLAVA_CHECK(cond, message parts...): the project's input check for extension ops.
//
// The message is built by adallava::message() from string pieces made with
// std::to_string and concatenation, never through std::ostream (c10::str,
// TORCH_CHECK's formatting, `<<` of a number). On the GPU image of the
// H200 run (torch 2.11.0+cu130, GCC 13.3) the extension had a static copy of
// libstdc++ linked in, and writing a number through that copy's ostream
// segfaulted: its locale facets are not usable in a process that already runs
// the shared libstdc++ (csrc/README.md). setup.py links the shared one; with
// no iostreams in the messages, the checks do not depend on it.
//
// It throws a std::runtime_error, not TORCH_CHECK's c10::Error: on the image
// of the H100 run a c10::Error thrown from an extension's op was not caught.
// torch raises a std::runtime_error in Python as a RuntimeError.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace adallava {
namespace detail {

inline std::string piece(const char* text) { return text; }
inline std::string piece(const std::string& text) { return text; }
inline std::string piece(c10::ScalarType dtype) { return c10::toString(dtype); }
// Device::str() is compiled into libc10, not here.
inline std::string piece(const c10::Device& device) { return device.str(); }

// "[2, 3, 8]", as torch prints sizes.
inline std::string piece(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

template <typename Int, typename = std::enable_if_t<std::is_integral_v<Int>>>
std::string piece(Int value) {
  return std::to_string(value);
}

}  // namespace detail

// The pieces concatenated: strings, integers, sizes, dtypes and devices.
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (out.append(detail::piece(parts)), ...);
  return out;
}

}  // namespace adallava

#define ADALLAVA_CHECK(cond, ...)                                 \
  do {                                                            \
    if (!(cond)) {                                                \
      throw std::runtime_error(::adallava::message(__VA_ARGS__)); \
    }                                                             \
  } while (false)
