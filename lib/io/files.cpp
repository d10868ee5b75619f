// Small file utilities for the io module: atomic writes that check every syscall (a full disk
// must surface as an error, never as a silently short file), strict JSON parsing, text reads.
// Caveat: durability of the rename also fsyncs the directory, best effort (errors ignored there).
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "core/core.h"
#include "io/io.h"
#include "io/io_impl.h"

namespace llmtune::io {
namespace detail {

AtomicFile::AtomicFile(const fs::path& final_path) : final_(final_path) {
  tmp_ = final_;
  tmp_ += ".tmp";
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    int err = errno;
    fail("cannot write {}: cannot create {}: {}", final_.string(), tmp_.string(), std::strerror(err));
  }
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFile::fail_errno(const char* what, int err) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::unlink(tmp_.c_str());
  fail("cannot write {}: {} failed: {} (the previous file, if any, is unchanged)", final_.string(), what,
       std::strerror(err));
}

void AtomicFile::write(const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    // Chunked: some kernels cap a single write at ~2 GiB.
    size_t chunk = std::min<size_t>(n, size_t(1) << 30);
    ssize_t w = ::write(fd_, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail_errno("write", errno);
    }
    if (w == 0) fail_errno("write", ENOSPC);
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  if (::fsync(fd_) != 0) fail_errno("fsync", errno);
  int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp_.c_str());
    fail("cannot write {}: close failed: {}", final_.string(), std::strerror(err));
  }
  if (::rename(tmp_.c_str(), final_.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp_.c_str());
    fail("cannot write {}: rename from {} failed: {}", final_.string(), tmp_.string(), std::strerror(err));
  }
  committed_ = true;
  fs::path dir = final_.parent_path().empty() ? fs::path(".") : final_.parent_path();
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

void write_file_atomic(const fs::path& path, std::string_view contents) {
  AtomicFile f(path);
  f.write(contents);
  f.commit();
}

nlohmann::json parse_json_strict(std::string_view text, const std::string& what_file) {
  using json = nlohmann::json;
  std::vector<std::set<std::string>> seen;  // one key set per open object
  std::vector<std::string> path;            // key path, for naming a duplicate
  std::string duplicate;
  json::parser_callback_t cb = [&](int /*depth*/, json::parse_event_t ev, json& parsed) -> bool {
    switch (ev) {
      case json::parse_event_t::object_start:
        seen.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!seen.empty()) seen.pop_back();
        break;
      case json::parse_event_t::key: {
        std::string k = parsed.get<std::string>();
        if (!seen.empty() && !seen.back().insert(k).second && duplicate.empty()) duplicate = k;
        break;
      }
      default:
        break;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true);
  } catch (const json::exception& e) {
    // e.what() reads "[json.exception.parse_error.101] parse error at line 1, column 7: ..."
    std::string msg = e.what();
    auto pos = msg.find("] ");
    if (pos != std::string::npos) msg = msg.substr(pos + 2);
    fail("{}: invalid JSON: {}", what_file, msg);
  }
  if (!duplicate.empty())
    fail("{}: duplicate JSON key \"{}\" (keys must be unique; the file is corrupt or hand-edited)", what_file,
         duplicate);
  return j;
}

std::string json_quote(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out.push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20)
          out += fmt::format("\\u{:04x}", c);
        else
          out.push_back(static_cast<char>(c));
    }
  }
  out.push_back('"');
  return out;
}

}  // namespace detail

std::string read_text_file(const fs::path& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail("cannot read {}: it is a directory, expected a file", path.string());
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    int err = errno;
    fail("cannot read {}: {}", path.string(), std::strerror(err ? err : ENOENT));
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail("cannot read {}: I/O error", path.string());
  return ss.str();
}

}  // namespace llmtune::io
