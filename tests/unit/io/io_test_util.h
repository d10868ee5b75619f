// Helpers for the io unit tests: temporary directories, scoped environment variables, and a
// writer of raw (possibly corrupt) safetensors files built byte by byte.
#pragma once
#include <stdlib.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "core/core.h"

namespace iotest {

namespace fs = std::filesystem;

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "llmtune-io-XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    REQUIRE(p != nullptr);
    path = p;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& s) const { return path / s; }
};

// Sets (or unsets, with nullopt) an environment variable for the scope of the object.
struct EnvVar {
  std::string name;
  std::optional<std::string> old;
  EnvVar(std::string n, std::optional<std::string> value) : name(std::move(n)) {
    if (const char* v = std::getenv(name.c_str())) old = v;
    if (value)
      ::setenv(name.c_str(), value->c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
  ~EnvVar() {
    if (old)
      ::setenv(name.c_str(), old->c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
};

inline void write_bytes(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

inline std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// 8-byte little-endian length (or `n_override`), header, then `data_len` bytes of data.
inline std::string raw_safetensors(const std::string& header, size_t data_len,
                                   std::optional<uint64_t> n_override = std::nullopt) {
  uint64_t n = n_override ? *n_override : header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  out += header;
  for (size_t i = 0; i < data_len; ++i) out.push_back(static_cast<char>(i * 7 + 1));
  return out;
}

// The message of the llmtune::Error thrown by `f` (fails the test if none is thrown).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const llmtune::Error& e) {
    return e.what();
  }
  FAIL("expected an llmtune::Error");
  return {};
}

}  // namespace iotest
