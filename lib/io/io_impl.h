// Internal helpers shared by the io/*.cpp files (not part of the public API): crash-safe
// file writing (tmp + fsync + rename, every write checked) and JSON parsing that names the
// file and rejects duplicate keys. Only lib/io includes this.
#pragma once
#include <fmt/ranges.h>

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace llmtune::io::detail {

namespace fs = std::filesystem;

// Writes through a POSIX fd to `final_path`.tmp; commit() fsyncs and renames it over
// `final_path`. If the object dies uncommitted (an exception), the tmp file is removed and any
// existing file at `final_path` is untouched. Errors throw llmtune::Error naming the path and
// strerror(errno) (for example "No space left on device").
class AtomicFile {
 public:
  explicit AtomicFile(const fs::path& final_path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, size_t n);
  void write(std::string_view s) { write(s.data(), s.size()); }
  void commit();
  const fs::path& tmp_path() const { return tmp_; }

 private:
  [[noreturn]] void fail_errno(const char* what, int err);
  fs::path final_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

// Writes a whole file atomically (see AtomicFile).
void write_file_atomic(const fs::path& path, std::string_view contents);

// Parses JSON text; on error throws Error("<what_file>: <reason>") with line/column. Duplicate
// object keys at any depth are rejected (the safetensors spec forbids them; nlohmann would keep
// the last silently).
nlohmann::json parse_json_strict(std::string_view text, const std::string& what_file);

// JSON string literal as serde_json writes it (used to match the reference writer's bytes).
std::string json_quote(std::string_view s);

}  // namespace llmtune::io::detail
