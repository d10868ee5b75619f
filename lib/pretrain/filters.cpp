// Document filters for pretraining corpora: length bounds, exact dedup (64-bit hash), MinHash
// near-dedup with an LSH index, and language id through libcld2 (dlopen'ed so the build does not
// depend on it). The perplexity filter needs a model and lives in cache.cpp.
// Caveat: cld2's C++ entry points are looked up by their mangled names (stable in Debian's 0.0.0).
#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>

#include <fmt/ranges.h>

#include "core/core.h"
#include "pretrain/pretrain.h"

namespace llmtune::pretrain {

namespace {

std::string_view trim(std::string_view s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

uint64_t splitmix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::vector<std::string_view> words_of(std::string_view s) {
  std::vector<std::string_view> w;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    size_t j = i;
    while (j < s.size() && !std::isspace(static_cast<unsigned char>(s[j]))) ++j;
    if (j > i) w.push_back(s.substr(i, j - i));
    i = j;
  }
  return w;
}

template <class T>
T get_or(const nlohmann::json& j, const char* key, T def, const std::string& where) {
  if (!j.contains(key) || j.at(key).is_null()) return def;
  try {
    return j.at(key).get<T>();
  } catch (const std::exception&) {
    fail("{}.{}: expected {}, got {}", where, key, typeid(T) == typeid(bool) ? "true/false" : "a number or string",
         j.at(key).dump());
  }
}

void check_keys(const nlohmann::json& j, const std::vector<std::string>& allowed, const std::string& where) {
  if (!j.is_object()) fail("{}: expected a map of settings, got {}", where, j.dump());
  for (const auto& [k, v] : j.items()) {
    if (std::find(allowed.begin(), allowed.end(), k) != allowed.end()) continue;
    auto guess = closest_match(k, allowed);
    fail("{}: unknown key `{}`{}; valid keys: {}", where, k, guess ? fmt::format(" — did you mean `{}`?", *guess) : "",
         fmt::format("{}", fmt::join(allowed, ", ")));
  }
}

// ---- libcld2 through dlopen -----------------------------------------------------------------
struct Cld2 {
  using Detect = int (*)(const char*, int, bool, bool*);
  using Code = const char* (*)(int);
  Detect detect = nullptr;
  Code code = nullptr;
  std::string error;
};
const Cld2& cld2() {
  static Cld2 c;
  static std::once_flag once;
  std::call_once(once, [] {
    void* h = dlopen("libcld2.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!h) h = dlopen("libcld2.so", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      c.error = fmt::format("libcld2 is not installed ({}); install the Debian package libcld2-0", dlerror());
      return;
    }
    c.detect = reinterpret_cast<Cld2::Detect>(dlsym(h, "_ZN4CLD214DetectLanguageEPKcibPb"));
    c.code = reinterpret_cast<Cld2::Code>(dlsym(h, "_ZN4CLD212LanguageCodeENS_8LanguageE"));
    if (!c.detect || !c.code) c.error = "libcld2.so.0 lacks CLD2::DetectLanguage / CLD2::LanguageCode (unexpected version)";
  });
  return c;
}

}  // namespace

// ---- configuration ------------------------------------------------------------------------------
FilterConfig FilterConfig::from_json(const nlohmann::json& j, const std::string& where) {
  FilterConfig c;
  if (j.is_null()) return c;
  check_keys(j, {"min_chars", "max_chars", "min_words", "dedup", "near_dedup", "language", "perplexity"}, where);
  c.min_chars = get_or<int64_t>(j, "min_chars", 0, where);
  c.max_chars = get_or<int64_t>(j, "max_chars", 0, where);
  c.min_words = get_or<int64_t>(j, "min_words", 0, where);
  c.dedup = get_or<bool>(j, "dedup", false, where);
  if (c.min_chars < 0 || c.max_chars < 0 || c.min_words < 0) fail("{}: length bounds must be >= 0", where);
  if (c.max_chars && c.max_chars < c.min_chars)
    fail("{}: max_chars {} is below min_chars {}", where, c.max_chars, c.min_chars);
  if (j.contains("near_dedup") && !j["near_dedup"].is_null() && j["near_dedup"] != false) {
    const auto& n = j["near_dedup"];
    const std::string w = where + ".near_dedup";
    c.near_dedup.enabled = true;
    if (!n.is_boolean()) {
      check_keys(n, {"threshold", "num_perm", "ngram", "bands", "seed"}, w);
      c.near_dedup.threshold = get_or<double>(n, "threshold", 0.8, w);
      c.near_dedup.num_perm = get_or<int>(n, "num_perm", 128, w);
      c.near_dedup.ngram = get_or<int>(n, "ngram", 5, w);
      c.near_dedup.bands = get_or<int>(n, "bands", 16, w);
      c.near_dedup.seed = get_or<uint64_t>(n, "seed", 1, w);
    }
    const auto& nd = c.near_dedup;
    if (nd.threshold <= 0 || nd.threshold > 1) fail("{}.threshold must be in (0, 1] (got {})", w, nd.threshold);
    if (nd.num_perm < 1 || nd.bands < 1 || nd.num_perm % nd.bands)
      fail("{}: num_perm ({}) must be a positive multiple of bands ({})", w, nd.num_perm, nd.bands);
    if (nd.ngram < 1) fail("{}.ngram must be >= 1", w);
  }
  if (j.contains("language") && !j["language"].is_null()) {
    const auto& l = j["language"];
    const std::string w = where + ".language";
    c.language.enabled = true;
    if (l.is_string()) {
      c.language.allow = {l.get<std::string>()};
    } else if (l.is_array()) {
      c.language.allow = l.get<std::vector<std::string>>();
    } else {
      check_keys(l, {"allow", "drop_unreliable"}, w);
      if (l.contains("allow")) c.language.allow = l["allow"].is_string() ? std::vector<std::string>{l["allow"].get<std::string>()}
                                                                          : l["allow"].get<std::vector<std::string>>();
      c.language.drop_unreliable = get_or<bool>(l, "drop_unreliable", false, w);
    }
    if (c.language.allow.empty()) fail("{}: give the languages to keep, e.g. language: {{allow: [en]}}", w);
  }
  if (j.contains("perplexity") && !j["perplexity"].is_null()) {
    const auto& p = j["perplexity"];
    const std::string w = where + ".perplexity";
    check_keys(p, {"model", "drop_fraction", "max_tokens"}, w);
    c.perplexity.enabled = true;
    c.perplexity.model = get_or<std::string>(p, "model", "", w);
    c.perplexity.drop_fraction = get_or<double>(p, "drop_fraction", 0.1, w);
    c.perplexity.max_tokens = get_or<int64_t>(p, "max_tokens", 256, w);
    if (c.perplexity.model.empty()) fail("{}.model: the scoring model (an HF checkpoint directory) is required", w);
    if (c.perplexity.drop_fraction < 0 || c.perplexity.drop_fraction >= 1)
      fail("{}.drop_fraction must be in [0, 1) (got {})", w, c.perplexity.drop_fraction);
    if (c.perplexity.max_tokens < 2) fail("{}.max_tokens must be >= 2", w);
  }
  return c;
}

nlohmann::json FilterConfig::to_json() const {
  nlohmann::json j = {{"min_chars", min_chars}, {"max_chars", max_chars}, {"min_words", min_words}, {"dedup", dedup}};
  if (near_dedup.enabled)
    j["near_dedup"] = {{"threshold", near_dedup.threshold}, {"num_perm", near_dedup.num_perm}, {"ngram", near_dedup.ngram},
                       {"bands", near_dedup.bands}, {"seed", near_dedup.seed}};
  if (language.enabled) j["language"] = {{"allow", language.allow}, {"drop_unreliable", language.drop_unreliable}};
  if (perplexity.enabled)
    j["perplexity"] = {{"model", perplexity.model}, {"drop_fraction", perplexity.drop_fraction},
                       {"max_tokens", perplexity.max_tokens}};
  return j;
}

bool FilterConfig::any() const {
  return min_chars || max_chars || min_words || dedup || near_dedup.enabled || language.enabled || perplexity.enabled;
}

// ---- report --------------------------------------------------------------------------------------
int64_t FilterReport::removed_by(const std::string& name) const {
  for (const auto& [n, c] : removed)
    if (n == name) return c;
  return 0;
}

std::string FilterReport::to_string() const {
  std::string s = fmt::format("  {:<14} {:>10} documents ({})\n", "input", documents_in, human_bytes(double(bytes_in)));
  for (const auto& [n, c] : removed)
    s += fmt::format("  {:<14} {:>10} removed ({:.2f}%)\n", n, c, documents_in ? 100.0 * double(c) / double(documents_in) : 0.0);
  s += fmt::format("  {:<14} {:>10} documents ({})", "kept", documents_out, human_bytes(double(bytes_out)));
  if (perplexity_threshold > 0) s += fmt::format("\n  perplexity threshold {:.2f}", perplexity_threshold);
  return s;
}

nlohmann::json FilterReport::to_json() const {
  nlohmann::json r = nlohmann::json::object();
  for (const auto& [n, c] : removed) r[n] = c;
  return {{"documents_in", documents_in}, {"documents_out", documents_out}, {"bytes_in", bytes_in},
          {"bytes_out", bytes_out}, {"removed", r}, {"removed_order", [&] {
            nlohmann::json a = nlohmann::json::array();
            for (const auto& p : removed) a.push_back(p.first);
            return a;
          }()},
          {"perplexity_threshold", perplexity_threshold}};
}

FilterReport FilterReport::from_json(const nlohmann::json& j) {
  FilterReport r;
  r.documents_in = j.at("documents_in");
  r.documents_out = j.at("documents_out");
  r.bytes_in = j.at("bytes_in");
  r.bytes_out = j.at("bytes_out");
  for (const auto& n : j.at("removed_order")) r.removed.emplace_back(n.get<std::string>(), j.at("removed").at(n.get<std::string>()).get<int64_t>());
  r.perplexity_threshold = j.value("perplexity_threshold", 0.0);
  return r;
}

// ---- hashing and MinHash ---------------------------------------------------------------------------
uint64_t hash64(std::string_view bytes, uint64_t seed) {
  uint64_t h = 0xcbf29ce484222325ull ^ splitmix(seed);
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return splitmix(h ^ bytes.size());
}

std::vector<uint32_t> minhash_signature(std::string_view text, int num_perm, int ngram, uint64_t seed) {
  // Shingle hashes: lower-cased words joined by one space.
  auto words = words_of(text);
  std::vector<uint64_t> shingles;
  const size_t n = static_cast<size_t>(std::max(1, ngram));
  std::string buf;
  auto add = [&](size_t from, size_t to) {
    buf.clear();
    for (size_t k = from; k < to; ++k) {
      if (k > from) buf.push_back(' ');
      for (char ch : words[k]) buf.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(ch))));
    }
    shingles.push_back(hash64(buf, 0x5eed));
  };
  if (words.size() < n) {
    add(0, words.size());
  } else {
    for (size_t i = 0; i + n <= words.size(); ++i) add(i, i + n);
  }
  // Permutations h_i(x) = (a_i * x + b_i) mod (2^61 - 1), truncated to 32 bits, as in the MinHash
  // literature; a_i, b_i from a seeded generator so signatures are comparable across runs.
  constexpr uint64_t kPrime = (1ull << 61) - 1;
  std::mt19937_64 rng(seed);
  std::vector<uint32_t> sig(static_cast<size_t>(num_perm), std::numeric_limits<uint32_t>::max());
  for (int p = 0; p < num_perm; ++p) {
    const uint64_t a = rng() % (kPrime - 1) + 1, b = rng() % kPrime;
    uint32_t best = std::numeric_limits<uint32_t>::max();
    for (uint64_t x : shingles) {
      const unsigned __int128 v = (static_cast<unsigned __int128>(a) * (x % kPrime) + b) % kPrime;
      best = std::min(best, static_cast<uint32_t>(static_cast<uint64_t>(v) & 0xffffffffu));
    }
    sig[static_cast<size_t>(p)] = best;
  }
  return sig;
}

double minhash_similarity(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
  if (a.size() != b.size() || a.empty()) return 0;
  size_t eq = 0;
  for (size_t i = 0; i < a.size(); ++i) eq += a[i] == b[i];
  return static_cast<double>(eq) / static_cast<double>(a.size());
}

MinHashIndex::MinHashIndex(int num_perm, int bands, double threshold)
    : num_perm_(num_perm), bands_(bands), rows_(num_perm / bands), threshold_(threshold), buckets_(bands) {}

bool MinHashIndex::insert(std::vector<uint32_t> sig) {
  std::vector<uint64_t> keys(static_cast<size_t>(bands_));
  for (int b = 0; b < bands_; ++b) {
    std::string_view bytes(reinterpret_cast<const char*>(sig.data() + b * rows_), sizeof(uint32_t) * rows_);
    keys[b] = hash64(bytes, static_cast<uint64_t>(b));
    auto [lo, hi] = buckets_[b].equal_range(keys[b]);
    for (auto it = lo; it != hi; ++it)
      if (minhash_similarity(sig, signatures_[it->second]) >= threshold_) return false;
  }
  const auto id = static_cast<uint32_t>(signatures_.size());
  signatures_.push_back(std::move(sig));
  for (int b = 0; b < bands_; ++b) buckets_[b].emplace(keys[b], id);
  return true;
}

// ---- language id ----------------------------------------------------------------------------------
bool language_id_available(std::string* why) {
  const auto& c = cld2();
  if (!c.error.empty() && why) *why = c.error;
  return c.error.empty();
}

LanguageGuess detect_language(std::string_view text) {
  const auto& c = cld2();
  if (!c.error.empty()) fail("filters.language: {}", c.error);
  bool reliable = false;
  const int lang = c.detect(text.data(), static_cast<int>(std::min<size_t>(text.size(), 1 << 30)), true, &reliable);
  const char* code = c.code(lang);
  return {code ? code : "un", reliable};
}

// ---- the streaming filter ----------------------------------------------------------------------------
DocumentFilter::DocumentFilter(const FilterConfig& config) : config_(config) {
  if (config_.near_dedup.enabled)
    near_ = std::make_unique<MinHashIndex>(config_.near_dedup.num_perm, config_.near_dedup.bands,
                                           config_.near_dedup.threshold);
  if (config_.language.enabled) {
    std::string why;
    if (!language_id_available(&why)) fail("filters.language: {}", why);
  }
}

std::string DocumentFilter::check(std::string_view doc) {
  const std::string_view t = trim(doc);
  const auto len = static_cast<int64_t>(t.size());
  if (config_.min_chars && len < config_.min_chars) return "min_chars";
  if (config_.max_chars && len > config_.max_chars) return "max_chars";
  if (config_.min_words && static_cast<int64_t>(words_of(t).size()) < config_.min_words) return "min_words";
  if (config_.dedup && !seen_.insert(hash64(t)).second) return "dedup";
  if (config_.language.enabled) {
    auto g = detect_language(t);
    const auto& allow = config_.language.allow;
    if (std::find(allow.begin(), allow.end(), g.code) == allow.end()) return "language";
    if (config_.language.drop_unreliable && !g.reliable) return "language";
  }
  if (near_ && !near_->insert(minhash_signature(t, config_.near_dedup.num_perm, config_.near_dedup.ngram,
                                                config_.near_dedup.seed)))
    return "near_dedup";
  return "";
}

}  // namespace llmtune::pretrain
