// Corpora -> filtered, tokenized, memory-mapped token cache. Pass 1 streams every document through
// the cheap filters and keeps one decision byte per document; the optional perplexity pass scores the
// survivors with a model; pass 2 streams again and tokenizes the kept documents in chunks on every core,
// appending tokens (uint16 when the vocabulary fits) and document offsets to files in a temp dir that is
// renamed into place when complete. Caveat: the corpus must not change between the passes.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <sstream>

#include "core/core.h"
#include "data/data.h"
#include "model/model.h"
#include "pretrain/pretrain.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::pretrain {

namespace {

constexpr int kCacheVersion = 1;

std::string trimmed(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

std::string format_of(const fs::path& p, const std::string& format) {
  if (format != "auto") return format;
  const std::string ext = p.extension().string();
  if (ext == ".jsonl" || ext == ".ndjson") return "jsonl";
  if (ext == ".json") return "json";
  return "text";
}

std::vector<fs::path> files_of(const CorpusSource& s) {
  std::error_code ec;
  if (fs::is_directory(s.path, ec)) {
    std::vector<fs::path> out;
    for (const auto& e : fs::directory_iterator(s.path))
      if (e.is_regular_file()) {
        const auto ext = e.path().extension().string();
        if (ext == ".txt" || ext == ".jsonl" || ext == ".json" || ext == ".ndjson" || ext == ".text") out.push_back(e.path());
      }
    std::sort(out.begin(), out.end());
    if (out.empty()) fail("pretraining dataset {}: the directory has no .txt/.jsonl/.json files", s.path);
    return out;
  }
  if (!fs::is_regular_file(s.path, ec))
    fail("pretraining dataset {}: no such file or directory (paths are relative to the working directory)", s.path);
  return {fs::path(s.path)};
}

std::string text_of(const nlohmann::json& rec, const std::string& field, const std::string& where) {
  if (!rec.is_object()) fail("{}: expected a JSON object with a `{}` field", where, field);
  auto it = rec.find(field);
  if (it == rec.end() || !it->is_string())
    fail("{}: no string field `{}`; set the dataset's `field:` (or `text_column:`) to the text column", where, field);
  return it->get<std::string>();
}

// Hash of the tokenizer files that decide its output.
std::string tokenizer_fingerprint(const tok::Tokenizer& t) {
  fs::path dir = t.source();
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) dir = dir.parent_path();
  std::string all = t.engine();
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}) {
    std::ifstream f(dir / name, std::ios::binary);
    if (!f) continue;
    std::ostringstream ss;
    ss << f.rdbuf();
    all += std::string("|") + name + ":" + data::hash_hex(ss.str());
  }
  return data::hash_hex(all);
}

nlohmann::json file_stamp(const fs::path& p) {
  std::error_code ec;
  const auto size = fs::file_size(p, ec);
  const auto mtime = fs::last_write_time(p, ec).time_since_epoch().count();
  return {{"path", fs::absolute(p).lexically_normal().string()}, {"size", ec ? 0 : size}, {"mtime", mtime}};
}

// Appends raw values to a file with a buffered stream; errors name the file.
class Appender {
 public:
  explicit Appender(const fs::path& p) : path_(p), f_(p, std::ios::binary | std::ios::trunc) {
    if (!f_) fail("cannot create {}; check permissions and free space of the cache dir", p.string());
  }
  template <class T>
  void put(const std::vector<T>& v) {
    f_.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
    if (!f_) fail("cannot write {}; check free space", path_.string());
  }
  void close() {
    f_.close();
    if (!f_) fail("cannot finish writing {}; check free space", path_.string());
  }

 private:
  fs::path path_;
  std::ofstream f_;
};

// Per-token average NLL of the first max_tokens tokens of each text, with a model and its tokenizer.
class PerplexityScorer {
 public:
  explicit PerplexityScorer(const FilterConfig::Perplexity& cfg) : cfg_(cfg) {
    const fs::path dir = cfg.model;
    if (!fs::is_regular_file(dir / "config.json"))
      fail("filters.perplexity.model: {} is not an HF checkpoint directory (no config.json)", dir.string());
    tok_ = tok::Tokenizer::load(dir);
    net_ = model::load_pretrained(dir, torch::kFloat);
    net_->eval();
  }
  double score(const std::string& text) {
    auto ids = tok_->encode(text, true);
    if (static_cast<int64_t>(ids.size()) > cfg_.max_tokens) ids.resize(static_cast<size_t>(cfg_.max_tokens));
    if (ids.size() < 2) return 0;  // nothing to predict: never the worst
    torch::NoGradGuard ng;
    auto t = torch::tensor(std::vector<int64_t>(ids.begin(), ids.end()), torch::kLong).unsqueeze(0);
    auto ls = model::sequence_nll(*net_, t);
    return std::exp(ls.sum.item<double>() / static_cast<double>(std::max<int64_t>(1, ls.n_tokens)));
  }

 private:
  FilterConfig::Perplexity cfg_;
  std::unique_ptr<tok::Tokenizer> tok_;
  model::Transformer net_{nullptr};
};

}  // namespace

// ---- reading -------------------------------------------------------------------------------------
void for_each_document(const CorpusSource& source, const std::function<void(std::string&& doc)>& fn) {
  for (const auto& file : files_of(source)) {
    const std::string fmt_ = format_of(file, source.format);
    std::ifstream in(file, std::ios::binary);
    if (!in) fail("cannot open {}", file.string());
    auto emit = [&](std::string&& d) {
      std::string t = trimmed(d);
      if (!t.empty()) fn(std::move(t));
    };
    if (fmt_ == "text") {
      if (source.text_split == "file") {
        std::ostringstream ss;
        ss << in.rdbuf();
        emit(ss.str());
        continue;
      }
      if (source.text_split != "line" && source.text_split != "paragraph")
        fail("{}: text_split `{}` is not one of line, paragraph, file", file.string(), source.text_split);
      const bool para = source.text_split == "paragraph";
      std::string line, doc;
      while (std::getline(in, line)) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (!para) {
          emit(std::move(line));
          line.clear();
          continue;
        }
        if (trimmed(line).empty()) {
          emit(std::move(doc));
          doc.clear();
        } else {
          if (!doc.empty()) doc.push_back('\n');
          doc += line;
        }
      }
      if (para) emit(std::move(doc));
    } else if (fmt_ == "jsonl") {
      std::string line;
      int64_t n = 0;
      while (std::getline(in, line)) {
        ++n;
        if (trimmed(line).empty()) continue;
        nlohmann::json rec;
        try {
          rec = nlohmann::json::parse(line);
        } catch (const std::exception& e) {
          fail("{}:{}: not valid JSON ({})", file.string(), n, e.what());
        }
        emit(text_of(rec, source.field, fmt::format("{}:{}", file.string(), n)));
      }
    } else if (fmt_ == "json") {
      nlohmann::json arr;
      try {
        arr = nlohmann::json::parse(in);
      } catch (const std::exception& e) {
        fail("{}: not valid JSON ({})", file.string(), e.what());
      }
      if (!arr.is_array()) fail("{}: expected a JSON array of records", file.string());
      for (size_t i = 0; i < arr.size(); ++i) emit(text_of(arr[i], source.field, fmt::format("{} record {}", file.string(), i)));
    } else {
      fail("{}: format `{}` is not one of text, jsonl, json", file.string(), fmt_);
    }
  }
}

// ---- the cache -----------------------------------------------------------------------------------
std::string cache_key(const CacheOptions& o, const tok::Tokenizer& tokenizer) {
  nlohmann::json k = {{"version", kCacheVersion}, {"tokenizer", tokenizer_fingerprint(tokenizer)},
                      {"filters", o.filters.to_json()}, {"add_eos", o.add_eos}};
  for (const auto& s : o.sources) {
    nlohmann::json files = nlohmann::json::array();
    for (const auto& f : files_of(s)) files.push_back(file_stamp(f));
    k["sources"].push_back({{"files", files}, {"format", s.format}, {"text_split", s.text_split}, {"field", s.field}});
  }
  if (o.filters.perplexity.enabled) {
    const fs::path m = o.filters.perplexity.model;
    for (const char* f : {"config.json", "model.safetensors", "model.safetensors.index.json"})
      if (fs::exists(m / f)) k["perplexity_model"].push_back(file_stamp(m / f));
  }
  return data::hash_hex(k.dump()).substr(0, 24);
}

CacheBuild build_cache(const CacheOptions& o, const tok::Tokenizer& tokenizer) {
  const double t0 = now_seconds();
  if (o.sources.empty()) fail("pretrain: no corpus given (pretraining_dataset: or datasets: with `path:` entries)");
  CacheBuild out;
  out.dir = o.cache_root / ("pretrain-" + cache_key(o, tokenizer));
  if (fs::is_regular_file(out.dir / "meta.json")) {
    auto cache = TokenCache::open(out.dir);
    out.hit = true;
    out.report = FilterReport::from_json(cache.meta().at("filter_report"));
    out.seconds = now_seconds() - t0;
    return out;
  }
  fs::create_directories(o.cache_root);

  // ---- pass 1: cheap filters, one decision per document ----
  DocumentFilter filter(o.filters);
  std::vector<std::string> order = {"min_chars", "max_chars", "min_words", "dedup", "language", "near_dedup", "perplexity"};
  std::map<std::string, int64_t> removed;
  std::vector<uint8_t> keep;
  FilterReport& rep = out.report;
  for (const auto& s : o.sources)
    for_each_document(s, [&](std::string&& d) {
      rep.bytes_in += static_cast<int64_t>(d.size());
      const std::string why = filter.check(d);
      keep.push_back(why.empty());
      if (!why.empty()) ++removed[why];
    });
  rep.documents_in = static_cast<int64_t>(keep.size());

  // ---- optional pass: perplexity of the survivors under a scoring model ----
  if (o.filters.perplexity.enabled) {
    PerplexityScorer scorer(o.filters.perplexity);
    std::vector<std::pair<double, int64_t>> scores;  // (perplexity, doc index)
    int64_t i = 0;
    ProgressBar bar("perplexity filter", static_cast<int64_t>(std::count(keep.begin(), keep.end(), 1)), "docs");
    for (const auto& s : o.sources)
      for_each_document(s, [&](std::string&& d) {
        if (keep[static_cast<size_t>(i)]) {
          scores.emplace_back(scorer.score(d), i);
          bar.update(1);
        }
        ++i;
      });
    bar.finish();
    // Worst first; ties by document order so the choice is deterministic.
    std::sort(scores.begin(), scores.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    const auto drop = static_cast<size_t>(o.filters.perplexity.drop_fraction * static_cast<double>(scores.size()));
    for (size_t k = 0; k < drop; ++k) keep[static_cast<size_t>(scores[k].second)] = 0;
    removed["perplexity"] = static_cast<int64_t>(drop);
    if (drop > 0) rep.perplexity_threshold = scores[drop - 1].first;
  }
  for (const auto& n : order) {
    const bool enabled = (n == "min_chars" && o.filters.min_chars) || (n == "max_chars" && o.filters.max_chars) ||
                         (n == "min_words" && o.filters.min_words) || (n == "dedup" && o.filters.dedup) ||
                         (n == "language" && o.filters.language.enabled) ||
                         (n == "near_dedup" && o.filters.near_dedup.enabled) ||
                         (n == "perplexity" && o.filters.perplexity.enabled);
    if (enabled) rep.removed.emplace_back(n, removed[n]);
  }

  // ---- pass 2: tokenize the kept documents in chunks, stream to disk ----
  const fs::path tmp = out.dir.string() + fmt::format(".tmp-{}", static_cast<long>(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  const int32_t vocab = tokenizer.vocab_size();
  const int token_bytes = vocab <= 65536 ? 2 : 4;
  const std::optional<int32_t> eos = tokenizer.eos_id();
  if (o.add_eos && !eos) fail("pretrain: the tokenizer has no EOS token to end documents with; set special_tokens.eos_token");
  Appender tokens_file(tmp / "tokens.bin"), docs_file(tmp / "docs.bin");
  int64_t n_tokens = 0, n_docs = 0;
  docs_file.put(std::vector<int64_t>{0});
  std::vector<std::string> chunk;
  int64_t chunk_bytes = 0;
  auto flush = [&] {
    if (chunk.empty()) return;
    auto enc = tokenizer.encode_batch(chunk, true, o.threads);
    std::vector<uint16_t> t16;
    std::vector<int32_t> t32;
    std::vector<int64_t> offs;
    for (auto& ids : enc) {
      if (o.add_eos && (ids.empty() || ids.back() != *eos)) ids.push_back(*eos);
      for (int32_t id : ids) {
        if (token_bytes == 2) t16.push_back(static_cast<uint16_t>(id));
        else t32.push_back(id);
      }
      n_tokens += static_cast<int64_t>(ids.size());
      offs.push_back(n_tokens);
      ++n_docs;
    }
    if (token_bytes == 2) tokens_file.put(t16);
    else tokens_file.put(t32);
    docs_file.put(offs);
    chunk.clear();
    chunk_bytes = 0;
  };
  int64_t i = 0;
  ProgressBar bar("tokenizing", rep.bytes_in, "B");
  int64_t seen_bytes = 0, reported = 0;
  for (const auto& s : o.sources)
    for_each_document(s, [&](std::string&& d) {
      seen_bytes += static_cast<int64_t>(d.size());
      if (keep[static_cast<size_t>(i++)]) {
        rep.bytes_out += static_cast<int64_t>(d.size());
        chunk_bytes += static_cast<int64_t>(d.size());
        chunk.push_back(std::move(d));
        if (chunk_bytes >= o.chunk_bytes) {
          flush();
          bar.update(seen_bytes - reported);
          reported = seen_bytes;
        }
      }
    });
  flush();
  bar.finish();
  tokens_file.close();
  docs_file.close();
  rep.documents_out = n_docs;
  nlohmann::json meta = {{"version", kCacheVersion}, {"num_tokens", n_tokens}, {"num_documents", n_docs},
                         {"token_bytes", token_bytes}, {"vocab_size", vocab}, {"eos_id", eos ? *eos : -1},
                         {"tokenizer", tokenizer.source().string()}, {"filter_report", rep.to_json()},
                         {"filters", o.filters.to_json()}};
  for (const auto& s : o.sources) meta["sources"].push_back(s.path);
  {
    std::ofstream m(tmp / "meta.json");
    m << meta.dump(2) << '\n';
    if (!m) fail("cannot write {}", (tmp / "meta.json").string());
  }
  std::error_code ec;
  fs::rename(tmp, out.dir, ec);
  if (ec) {
    fs::remove_all(tmp);
    if (!fs::is_regular_file(out.dir / "meta.json"))  // another process may have won the race
      fail("cannot move the token cache into place at {}: {}", out.dir.string(), ec.message());
  }
  out.seconds = now_seconds() - t0;
  return out;
}

// ---- memory-mapped reading ------------------------------------------------------------------------
namespace {
std::pair<void*, size_t> map_file(const fs::path& p, size_t expect) {
  const int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) fail("token cache: cannot open {}; delete the cache dir to rebuild it", p.string());
  struct stat st {};
  ::fstat(fd, &st);
  const auto len = static_cast<size_t>(st.st_size);
  if (len != expect) {
    ::close(fd);
    fail("token cache: {} has {} bytes, expected {}; the cache is corrupt — delete {} to rebuild it", p.string(), len,
         expect, p.parent_path().string());
  }
  void* m = nullptr;
  if (len > 0) {
    m = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
      ::close(fd);
      fail("token cache: cannot mmap {}", p.string());
    }
  }
  ::close(fd);
  return {m, len};
}
}  // namespace

TokenCache TokenCache::open(const fs::path& dir) {
  TokenCache c;
  c.dir_ = dir;
  std::ifstream m(dir / "meta.json");
  if (!m) fail("token cache {}: no meta.json (incomplete build?); delete the directory to rebuild", dir.string());
  try {
    c.meta_ = nlohmann::json::parse(m);
    c.num_tokens_ = c.meta_.at("num_tokens");
    c.num_docs_ = c.meta_.at("num_documents");
    c.token_bytes_ = c.meta_.at("token_bytes");
    if (c.meta_.at("version") != kCacheVersion) fail("version {}", c.meta_.at("version").dump());
  } catch (const std::exception& e) {
    fail("token cache {}: meta.json is unreadable ({}); delete the directory to rebuild", dir.string(), e.what());
  }
  auto [tm, tl] = map_file(dir / "tokens.bin", static_cast<size_t>(c.num_tokens_) * static_cast<size_t>(c.token_bytes_));
  c.tokens_map_ = tm;
  c.tokens_len_ = tl;
  auto [dm, dl] = map_file(dir / "docs.bin", static_cast<size_t>(c.num_docs_ + 1) * sizeof(int64_t));
  c.docs_map_ = dm;
  c.docs_len_ = dl;
  c.docs_ = static_cast<const int64_t*>(dm);
  return c;
}

TokenCache::TokenCache(TokenCache&& o) noexcept { *this = std::move(o); }
TokenCache& TokenCache::operator=(TokenCache&& o) noexcept {
  if (this == &o) return *this;
  this->~TokenCache();
  dir_ = std::move(o.dir_);
  meta_ = std::move(o.meta_);
  num_tokens_ = o.num_tokens_;
  num_docs_ = o.num_docs_;
  token_bytes_ = o.token_bytes_;
  tokens_map_ = std::exchange(o.tokens_map_, nullptr);
  tokens_len_ = std::exchange(o.tokens_len_, 0);
  docs_map_ = std::exchange(o.docs_map_, nullptr);
  docs_len_ = std::exchange(o.docs_len_, 0);
  docs_ = std::exchange(o.docs_, nullptr);
  return *this;
}
TokenCache::~TokenCache() {
  if (tokens_map_) ::munmap(tokens_map_, tokens_len_);
  if (docs_map_) ::munmap(docs_map_, docs_len_);
  tokens_map_ = docs_map_ = nullptr;
}

int32_t TokenCache::token(int64_t i) const {
  return token_bytes_ == 2 ? static_cast<const uint16_t*>(tokens_map_)[i] : static_cast<const int32_t*>(tokens_map_)[i];
}

void TokenCache::read(int64_t start, int64_t count, int64_t* out) const {
  if (start < 0 || start + count > num_tokens_) fail("token cache: read [{}, {}) past the end ({})", start, start + count, num_tokens_);
  if (token_bytes_ == 2) {
    const auto* p = static_cast<const uint16_t*>(tokens_map_) + start;
    for (int64_t k = 0; k < count; ++k) out[k] = p[k];
  } else {
    const auto* p = static_cast<const int32_t*>(tokens_map_) + start;
    for (int64_t k = 0; k < count; ++k) out[k] = p[k];
  }
}

int64_t TokenCache::document_of(int64_t pos) const {
  // The last document whose start is <= pos.
  const int64_t* it = std::upper_bound(docs_, docs_ + num_docs_ + 1, pos);
  return static_cast<int64_t>(it - docs_) - 1;
}

}  // namespace llmtune::pretrain
