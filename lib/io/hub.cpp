// Hub ids -> local directories through the standard Hugging Face cache, downloading what is
// missing with libcurl. The cache layout is huggingface_hub's (models--org--name/{refs,blobs,
// snapshots,.no_exist}), so caches are shared with Python tools in both directions. Caveats: a
// cached branch is trusted without asking the server for a newer commit (pin a sha for
// reproducibility, delete refs/<branch> to refresh); downloads are not checksummed (like the hub).
#include <curl/curl.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <regex>
#include <set>
#include <thread>

#include "core/core.h"
#include "io/io.h"
#include "io/io_impl.h"

namespace llmtune::io {
namespace {

// A failure to reach the server (as opposed to an answer saying no): callers may fall back
// to a cached snapshot that has every required file.
struct NetworkError : Error {
  using Error::Error;
};

std::string env_str(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

bool env_truthy(const char* name) {
  std::string v = env_str(name);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
  return v == "1" || v == "on" || v == "yes" || v == "true";
}

fs::path home_dir() {
  std::string h = env_str("HOME");
  return h.empty() ? fs::path("/tmp") : fs::path(h);
}

// Same precedence as huggingface_hub's constants.py.
fs::path hub_cache_dir() {
  if (auto v = env_str("HF_HUB_CACHE"); !v.empty()) return v;
  if (auto v = env_str("HUGGINGFACE_HUB_CACHE"); !v.empty()) return v;
  if (auto v = env_str("HF_HOME"); !v.empty()) return fs::path(v) / "hub";
  if (auto v = env_str("XDG_CACHE_HOME"); !v.empty()) return fs::path(v) / "huggingface" / "hub";
  return home_dir() / ".cache" / "huggingface" / "hub";
}

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}

// HF_TOKEN, else the token file `hf auth login` writes.
std::string hub_token() {
  if (auto v = env_str("HF_TOKEN"); !v.empty()) return trim(v);
  if (auto v = env_str("HUGGING_FACE_HUB_TOKEN"); !v.empty()) return trim(v);
  fs::path p;
  if (auto v = env_str("HF_TOKEN_PATH"); !v.empty())
    p = v;
  else if (auto h = env_str("HF_HOME"); !h.empty())
    p = fs::path(h) / "token";
  else
    p = home_dir() / ".cache" / "huggingface" / "token";
  std::error_code ec;
  if (!fs::is_regular_file(p, ec)) return {};
  try {
    return trim(read_text_file(p));
  } catch (const Error&) {
    return {};
  }
}

bool is_commit_sha(const std::string& s) {
  return s.size() == 40 && std::all_of(s.begin(), s.end(), [](char c) {
           return std::isxdigit(static_cast<unsigned char>(c)) && !std::isupper(static_cast<unsigned char>(c));
         });
}

// huggingface_hub's validate_repo_id rules: [org/]name of [A-Za-z0-9_.-], no "--" or "..",
// not starting/ending with '-' or '.', at most 96 characters.
void validate_repo_id(const std::string& id) {
  static const std::regex part(R"([A-Za-z0-9_.\-]+)");
  auto slash = id.find('/');
  std::vector<std::string> parts;
  if (slash == std::string::npos)
    parts = {id};
  else
    parts = {id.substr(0, slash), id.substr(slash + 1)};
  bool ok = id.size() <= 96 && id.find("--") == std::string::npos && id.find("..") == std::string::npos;
  for (const auto& p : parts)
    ok = ok && !p.empty() && std::regex_match(p, part) && p.front() != '-' && p.front() != '.' && p.back() != '-' &&
         p.back() != '.';
  if (!ok)
    fail(
        "\"{}\" is neither an existing local directory nor a valid Hugging Face model id (expected \"org/name\" "
        "using letters, digits, '-', '_', '.'; no \"--\" or \"..\"; at most 96 characters)",
        id);
}

std::string repo_folder(const std::string& id) {
  std::string out = "models--";
  for (char c : id) {
    if (c == '/')
      out += "--";
    else
      out.push_back(c);
  }
  return out;
}

std::string url_escape(const std::string& s, bool keep_slash) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || (keep_slash && c == '/'))
      out.push_back(c);
    else
      out += fmt::format("%{:02X}", c);
  }
  return out;
}

// An ETag as a blob file name: quotes and the weak marker stripped, nothing path-like kept.
std::string etag_to_blob_name(std::string e) {
  e = trim(e);
  if (e.rfind("W/", 0) == 0) e = e.substr(2);
  if (e.size() >= 2 && e.front() == '"' && e.back() == '"') e = e.substr(1, e.size() - 2);
  for (char& c : e)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) c = '_';
  if (e.empty() || e == "." || e == "..") return {};
  return e;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

void curl_init_once() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct Headers {
  long status = 0;
  std::map<std::string, std::string> h;  // lower-case name -> value, for the current response
  std::string get(const std::string& k) const {
    auto it = h.find(k);
    return it == h.end() ? std::string() : it->second;
  }
};

size_t on_header(char* data, size_t size, size_t n, void* user) {
  auto* hd = static_cast<Headers*>(user);
  std::string line(data, size * n);
  while (!line.empty() && (line.back() == '\r' || line.back() == '\n')) line.pop_back();
  if (line.rfind("HTTP/", 0) == 0) {  // a new response (redirect hop or 100-continue): restart
    hd->h.clear();
    auto sp = line.find(' ');
    hd->status = sp == std::string::npos ? 0 : std::atol(line.c_str() + sp + 1);
  } else if (auto c = line.find(':'); c != std::string::npos) {
    hd->h[lower(trim(line.substr(0, c)))] = trim(line.substr(c + 1));
  }
  return size * n;
}

struct Curl {
  CURL* c;
  curl_slist* hdrs = nullptr;
  char err[CURL_ERROR_SIZE] = {0};
  Curl(const std::string& url, const std::string& token) {
    curl_init_once();
    c = curl_easy_init();
    if (!c) throw NetworkError("cannot initialise libcurl");
    curl_easy_setopt(c, CURLOPT_URL, url.c_str());
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, err);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "llmtune/0.1 (libcurl)");
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 30L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);  // abort a stalled transfer (resumable anyway)
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, 60L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    hdrs = curl_slist_append(hdrs, "Accept-Encoding: identity");  // sizes must be the real file sizes
    // libcurl sends a custom Authorization header only to the original host, not to the CDN a
    // file redirects to (whose signed URL would reject it).
    if (!token.empty()) hdrs = curl_slist_append(hdrs, ("Authorization: Bearer " + token).c_str());
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
  }
  ~Curl() {
    curl_easy_cleanup(c);
    curl_slist_free_all(hdrs);
  }
};

struct FileMeta {
  long status = 0;
  std::string commit, etag, url;
  int64_t size = -1;
};

[[noreturn]] void auth_error(const std::string& id, const std::string& url, long status) {
  fail(
      "{} returned HTTP {} for {}: the model is gated, private or misspelled. Set HF_TOKEN to a token from "
      "https://huggingface.co/settings/tokens and accept the model licence on its page "
      "(https://huggingface.co/{}), or check the id",
      url, status, id, id);
}

// HEAD without following redirects to another host: the hub's own answer carries the commit,
// the ETag (X-Linked-Etag for large files) and the size. Relative redirects (renamed repos)
// are followed. Throws NetworkError when the server cannot be reached.
FileMeta head(const std::string& url, const std::string& token) {
  FileMeta m;
  std::string cur = url;
  for (int hop = 0; hop < 6; ++hop) {
    Curl cu(cur, token);
    Headers hd;
    curl_easy_setopt(cu.c, CURLOPT_NOBODY, 1L);
    curl_easy_setopt(cu.c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(cu.c, CURLOPT_TIMEOUT, 120L);
    curl_easy_setopt(cu.c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(cu.c, CURLOPT_HEADERDATA, &hd);
    CURLcode rc = curl_easy_perform(cu.c);
    if (rc != CURLE_OK)
      throw NetworkError(fmt::format("cannot reach {}: {}", cur, cu.err[0] ? cu.err : curl_easy_strerror(rc)));
    curl_easy_getinfo(cu.c, CURLINFO_RESPONSE_CODE, &m.status);
    if (auto v = hd.get("x-repo-commit"); !v.empty()) m.commit = v;
    std::string etag = hd.get("x-linked-etag");
    if (etag.empty()) etag = hd.get("etag");
    if (!etag.empty()) m.etag = etag_to_blob_name(etag);
    std::string sz = hd.get("x-linked-size");
    if (sz.empty() && m.status >= 200 && m.status < 300) sz = hd.get("content-length");
    if (!sz.empty()) m.size = std::atoll(sz.c_str());
    m.url = cur;
    std::string loc = hd.get("location");
    if (m.status >= 300 && m.status < 400 && !loc.empty() && loc[0] == '/') {
      auto scheme_end = cur.find("://");
      auto host_end = cur.find('/', scheme_end == std::string::npos ? 0 : scheme_end + 3);
      cur = cur.substr(0, host_end) + loc;
      continue;
    }
    return m;
  }
  throw NetworkError(fmt::format("too many redirects for {}", url));
}

struct Sink {
  FILE* f = nullptr;
  Headers* hd = nullptr;
  int64_t offset = 0;  // bytes already in the file when the request started
  bool decided = false, writing = false, range_mismatch = false;
  int write_errno = 0;
  std::string error_body;
  ProgressBar* bar = nullptr;
};

size_t on_body(char* data, size_t size, size_t n, void* user) {
  auto* s = static_cast<Sink*>(user);
  size_t len = size * n;
  if (!s->decided) {
    s->decided = true;
    if (s->hd->status == 206) {
      // The server honoured Range: append, but only if it resumes exactly where the file ends.
      std::string cr = s->hd->get("content-range");  // "bytes START-END/TOTAL"
      auto sp = cr.find(' ');
      int64_t start = sp == std::string::npos ? -1 : std::atoll(cr.c_str() + sp + 1);
      if (start != s->offset) {
        s->range_mismatch = true;
        return 0;
      }
      s->writing = true;
    } else if (s->hd->status == 200) {
      s->writing = true;  // full body: start over
      if (fflush(s->f) != 0 || ftruncate(fileno(s->f), 0) != 0 || fseek(s->f, 0, SEEK_SET) != 0) {
        s->write_errno = errno;
        return 0;
      }
      s->offset = 0;
    }
  }
  if (!s->writing) {
    if (s->error_body.size() < 2048) s->error_body.append(data, std::min<size_t>(len, 2048));
    return len;
  }
  if (fwrite(data, 1, len, s->f) != len) {
    s->write_errno = errno ? errno : EIO;
    return 0;  // aborts the transfer with CURLE_WRITE_ERROR
  }
  if (s->bar) s->bar->update(static_cast<int64_t>(len));
  return len;
}

int64_t file_size_or_zero(const fs::path& p) {
  std::error_code ec;
  auto s = fs::file_size(p, ec);
  return ec ? 0 : static_cast<int64_t>(s);
}

// Downloads `url` into `part`, resuming from its current size with a Range request. Retries
// transient failures (network errors, 5xx) with backoff; the partial file survives a failure.
void download_to(const std::string& id, const std::string& url, const fs::path& part, int64_t expected,
                 const std::string& token, bool show_progress, const std::string& label) {
  const int attempts = 5;
  std::string last_error;
  for (int attempt = 0; attempt < attempts; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(500 << std::min(attempt, 4)));
    int64_t have = file_size_or_zero(part);
    if (expected >= 0 && have > expected) {
      fs::remove(part);
      have = 0;
    }
    if (expected >= 0 && have == expected && have > 0) return;
    FILE* f = std::fopen(part.c_str(), "ab");
    if (!f) fail("cannot write {}: {}", part.string(), std::strerror(errno));
    Curl cu(url, token);
    Headers hd;
    Sink sink;
    sink.f = f;
    sink.hd = &hd;
    sink.offset = have;
    std::unique_ptr<ProgressBar> bar;
    if (show_progress && expected >= (int64_t(16) << 20)) {
      bar = std::make_unique<ProgressBar>(have > 0 ? label + " (resuming)" : label, expected - have, "B");
      sink.bar = bar.get();
    }
    std::string range = fmt::format("{}-", have);
    if (have > 0) curl_easy_setopt(cu.c, CURLOPT_RANGE, range.c_str());
    curl_easy_setopt(cu.c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(cu.c, CURLOPT_MAXREDIRS, 10L);
    curl_easy_setopt(cu.c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(cu.c, CURLOPT_HEADERDATA, &hd);
    curl_easy_setopt(cu.c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(cu.c, CURLOPT_WRITEDATA, &sink);
    CURLcode rc = curl_easy_perform(cu.c);
    long status = 0;
    curl_easy_getinfo(cu.c, CURLINFO_RESPONSE_CODE, &status);
    bool close_ok = std::fclose(f) == 0;
    if (bar) bar->finish();
    if (sink.write_errno || (!close_ok && rc == CURLE_OK))
      fail("cannot write {}: {}; free some space (the partial download is kept and resumes next time)", part.string(),
           std::strerror(sink.write_errno ? sink.write_errno : errno));
    if (sink.range_mismatch) {  // a confused server or proxy: start over rather than corrupt
      fs::remove(part);
      last_error = fmt::format("{}: the server resumed at the wrong offset", url);
      continue;
    }
    if (rc == CURLE_OK && (status == 200 || status == 206)) {
      int64_t got = file_size_or_zero(part);
      if (expected < 0 || got == expected) return;
      last_error = fmt::format("{}: received {} bytes in total, expected {}", url, got, expected);
      if (got > expected) fs::remove(part);
      continue;
    }
    if (rc == CURLE_OK && status == 416) {  // range past the end: the part is complete or stale
      if (expected >= 0 && file_size_or_zero(part) == expected) return;
      fs::remove(part);
      last_error = fmt::format("{}: HTTP 416 for a resumed download; restarting", url);
      continue;
    }
    if (rc == CURLE_OK && (status == 401 || status == 403)) auth_error(id, url, status);
    if (rc == CURLE_OK && status == 404) fail("{} not found (HTTP 404) while downloading", url);
    if (rc == CURLE_OK && status >= 400 && status < 500)
      fail("{} returned HTTP {}: {}", url, status, trim(sink.error_body.substr(0, 300)));
    last_error = rc != CURLE_OK ? fmt::format("{}: {}", url, cu.err[0] ? cu.err : curl_easy_strerror(rc))
                                : fmt::format("{}: HTTP {}", url, status);
    log::warn(fmt::format("download of {} interrupted ({}); retrying", label, last_error));
  }
  throw NetworkError(
      fmt::format("download failed after {} attempts: {}; the partial file {} is kept, run again to "
                  "resume",
                  attempts, last_error, part.string()));
}

// An exclusive advisory lock (flock) on a lock file: several processes (one per GPU rank)
// resolving the same model wait for one download instead of corrupting it.
class FileLock {
 public:
  explicit FileLock(const fs::path& p) {
    std::error_code ec;
    fs::create_directories(p.parent_path(), ec);
    fd_ = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ >= 0)
      while (::flock(fd_, LOCK_EX) != 0 && errno == EINTR) {
      }
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);  // closing releases the lock
  }

 private:
  int fd_ = -1;
};

void link_into_snapshot(const fs::path& blob, const fs::path& target) {
  std::error_code ec;
  fs::create_directories(target.parent_path(), ec);
  fs::path rel = blob.lexically_relative(target.parent_path());
  fs::path tmp = target;
  tmp += ".link-tmp";
  fs::remove(tmp, ec);
  fs::create_symlink(rel, tmp, ec);
  if (!ec) {
    fs::rename(tmp, target, ec);
    if (!ec) return;
    fs::remove(tmp, ec);
  }
  // No symlinks on this filesystem (as huggingface_hub does on Windows): keep a copy instead.
  fs::remove(target, ec);
  fs::copy_file(blob, target, fs::copy_options::overwrite_existing, ec);
  if (ec) fail("cannot place {} in the cache: {}", target.string(), ec.message());
}

std::vector<std::string> index_shards(const fs::path& index_path) {
  nlohmann::json j = detail::parse_json_strict(read_text_file(index_path), index_path.string());
  std::set<std::string> s;
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    fail("{}: expected an object with a \"weight_map\" object", index_path.string());
  for (const auto& v : j["weight_map"])
    if (v.is_string()) s.insert(v.get<std::string>());
  return {s.begin(), s.end()};
}

struct Wanted {
  std::string name;
  bool optional;
};

const char* kIndexName = "model.safetensors.index.json";

struct RepoCache {
  fs::path root, repo;
  std::string id;
  fs::path snapshot(const std::string& sha) const { return repo / "snapshots" / sha; }
  fs::path no_exist(const std::string& sha, const std::string& f) const { return repo / ".no_exist" / sha / f; }
  fs::path ref(const std::string& rev) const { return repo / "refs" / rev; }
};

// Which wanted files a cached snapshot lacks. `unknown` = optional files neither present nor
// recorded as absent on the server (.no_exist), i.e. worth asking the server about.
void check_snapshot(const RepoCache& rc, const std::string& sha, const std::vector<Wanted>& wanted,
                    std::vector<std::string>& missing_required, std::vector<std::string>& unknown) {
  std::error_code ec;
  fs::path snap = rc.snapshot(sha);
  for (const auto& w : wanted) {
    if (fs::exists(snap / w.name, ec)) continue;
    if (!w.optional)
      missing_required.push_back(w.name);
    else if (!fs::exists(rc.no_exist(sha, w.name), ec))
      unknown.push_back(w.name);
  }
  if (fs::exists(snap / kIndexName, ec))
    for (const auto& s : index_shards(snap / kIndexName))
      if (!fs::exists(snap / s, ec)) missing_required.push_back(s);
}

// Downloads what is missing; returns the snapshot directory.
fs::path download_snapshot(const RepoCache& rc, const std::string& revision, const std::vector<Wanted>& wanted,
                           bool show_progress) {
  std::string endpoint = env_str("HF_ENDPOINT");
  if (endpoint.empty()) endpoint = "https://huggingface.co";
  while (!endpoint.empty() && endpoint.back() == '/') endpoint.pop_back();
  const std::string token = hub_token();
  std::string commit = is_commit_sha(revision) ? revision : "";
  std::deque<Wanted> queue(wanted.begin(), wanted.end());
  std::set<std::string> queued;
  for (const auto& w : wanted) queued.insert(w.name);
  std::error_code ec;

  auto enqueue_shards = [&](const fs::path& index) {
    for (const auto& s : index_shards(index))
      if (queued.insert(s).second) queue.push_back({s, false});
  };

  while (!queue.empty()) {
    Wanted w = queue.front();
    queue.pop_front();
    if (w.name.find("..") != std::string::npos || fs::path(w.name).is_absolute())
      fail("refusing to download \"{}\" from {}: the name points outside the repository", w.name, rc.id);
    if (!commit.empty()) {
      if (fs::exists(rc.snapshot(commit) / w.name, ec)) {
        if (w.name == kIndexName) enqueue_shards(rc.snapshot(commit) / w.name);
        continue;
      }
      if (w.optional && fs::exists(rc.no_exist(commit, w.name), ec)) continue;
    }
    const std::string url =
        fmt::format("{}/{}/resolve/{}/{}", endpoint, rc.id, url_escape(commit.empty() ? revision : commit, false),
                    url_escape(w.name, true));
    FileMeta m = head(url, token);
    if (m.status == 401 || m.status == 403) auth_error(rc.id, url, m.status);
    if (m.status == 404) {
      if (!w.optional)
        fail(
            "{} has no file {} at revision \"{}\": {} returned HTTP 404; check the model id, the revision and "
            "the file name",
            rc.id, w.name, revision, url);
      std::string sha = !commit.empty() ? commit : m.commit;
      if (!sha.empty()) {  // remember the absence, as huggingface_hub does, so offline runs know
        fs::create_directories(rc.no_exist(sha, w.name).parent_path(), ec);
        detail::write_file_atomic(rc.no_exist(sha, w.name), "");
      }
      log::debug(fmt::format("{}: optional file {} not in the repository", rc.id, w.name));
      continue;
    }
    if (m.status >= 500) throw NetworkError(fmt::format("{} returned HTTP {}", url, m.status));
    if (m.status < 200 || m.status >= 400) fail("{} returned HTTP {}", url, m.status);
    if (commit.empty()) {
      commit = m.commit.empty() ? revision : m.commit;
      if (fs::exists(rc.snapshot(commit) / w.name, ec)) {
        if (w.name == kIndexName) enqueue_shards(rc.snapshot(commit) / w.name);
        continue;
      }
    }
    const fs::path target = rc.snapshot(commit) / w.name;
    fs::create_directories(target.parent_path(), ec);
    const std::string get_url = url;  // redirects (to a CDN) are followed by the GET
    if (!m.etag.empty()) {
      const fs::path blob = rc.repo / "blobs" / m.etag;
      fs::create_directories(blob.parent_path(), ec);
      {
        FileLock lock(rc.root / ".locks" / rc.repo.filename() / (m.etag + ".lock"));
        if (!fs::exists(blob, ec)) {
          fs::path part = blob;
          part += ".incomplete";
          if (show_progress)
            log::info(fmt::format("downloading {}/{}{}", rc.id, w.name,
                                  m.size >= 0 ? " (" + human_bytes(double(m.size)) + ")" : ""));
          download_to(rc.id, get_url, part, m.size, token, show_progress, w.name);
          fs::rename(part, blob, ec);
          if (ec) fail("cannot move {} to {}: {}", part.string(), blob.string(), ec.message());
        }
      }
      link_into_snapshot(blob, target);
    } else {
      fs::path part = target;
      part += ".incomplete";
      download_to(rc.id, get_url, part, m.size, token, show_progress, w.name);
      fs::rename(part, target, ec);
      if (ec) fail("cannot move {} to {}: {}", part.string(), target.string(), ec.message());
    }
    if (w.name == kIndexName) enqueue_shards(target);
  }
  if (commit.empty()) commit = revision;  // nothing was fetched and no sha known: every file optional and absent
  if (revision != commit) {
    fs::create_directories(rc.ref(revision).parent_path(), ec);
    detail::write_file_atomic(rc.ref(revision), commit);
  }
  fs::create_directories(rc.snapshot(commit), ec);
  return rc.snapshot(commit);
}

}  // namespace

fs::path resolve_model_path(const std::string& model, const HubOptions& options) {
  if (model.empty()) fail("no model given: set base_model to a local directory or a Hugging Face id (org/name)");
  std::error_code ec;
  fs::path p = model;
  if (model.rfind("~/", 0) == 0) p = home_dir() / model.substr(2);
  if (model == "default" && !fs::exists(p, ec)) {
    // The embedded default base model (models/default, built by scripts/make_default_model.sh).
    const char* env = std::getenv("LLMTUNE_DEFAULT_MODEL");
    fs::path dir = env && *env ? fs::path(env) : fs::path(LLMTUNE_DEFAULT_MODEL_DIR);
    if (!fs::exists(dir / "config.json", ec))
      fail("the default model is not at {} (config.json missing); set LLMTUNE_DEFAULT_MODEL or rebuild it with "
           "scripts/make_default_model.sh", dir.string());
    return dir;
  }
  if (fs::exists(p, ec)) {
    if (fs::is_directory(p, ec)) return p;
    fail("{} is a file; the model must be a directory holding config.json and the weights, or a hub id", model);
  }
  const bool path_like = model[0] == '/' || model[0] == '.' || model[0] == '~' ||
                         std::count(model.begin(), model.end(), '/') > 1 || model.find('\\') != std::string::npos;
  if (path_like) fail("model directory {} does not exist", model);
  validate_repo_id(model);
  if (options.revision.empty()) fail("{}: empty revision", model);

  std::vector<Wanted> wanted;
  for (const auto& f : options.files) {
    if (f.empty() || f == "?") continue;
    if (f[0] == '?')
      wanted.push_back({f.substr(1), true});
    else
      wanted.push_back({f, false});
  }
  RepoCache rc;
  rc.root = hub_cache_dir();
  rc.id = model;
  rc.repo = rc.root / repo_folder(model);
  const std::string& rev = options.revision;

  std::string sha;
  if (is_commit_sha(rev))
    sha = rev;
  else if (fs::is_regular_file(rc.ref(rev), ec))
    sha = trim(read_text_file(rc.ref(rev)));
  std::vector<std::string> missing, unknown;
  if (!sha.empty()) {
    check_snapshot(rc, sha, wanted, missing, unknown);
    if (missing.empty() && unknown.empty()) return rc.snapshot(sha);
  }
  const bool offline = env_truthy("HF_HUB_OFFLINE");
  if (offline) {
    if (!sha.empty() && missing.empty()) return rc.snapshot(sha);
    if (sha.empty())
      fail(
          "HF_HUB_OFFLINE=1 and {} (revision \"{}\") is not in the Hugging Face cache: looked for {}; download it "
          "once with network access (unset HF_HUB_OFFLINE), set HF_HUB_CACHE/HF_HOME to the cache that has it, or "
          "give a local directory",
          model, rev, is_commit_sha(rev) ? rc.snapshot(rev).string() : rc.ref(rev).string());
    fail(
        "HF_HUB_OFFLINE=1 and the cached snapshot {} of {} lacks {}; download it once with network access (unset "
        "HF_HUB_OFFLINE) or give a local directory",
        rc.snapshot(sha).string(), model, fmt::join(missing, ", "));
  }
  try {
    return download_snapshot(rc, rev, wanted, options.show_progress);
  } catch (const NetworkError& e) {
    if (!sha.empty() && missing.empty()) {
      log::warn(fmt::format("{}; using the cached snapshot {}", e.what(), rc.snapshot(sha).string()));
      return rc.snapshot(sha);
    }
    fail(
        "cannot download {} and it is not fully cached in {}: {}. Check the network, or set HF_ENDPOINT for a "
        "mirror",
        model, rc.repo.string(), e.what());
  }
}

}  // namespace llmtune::io
