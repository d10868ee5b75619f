// llmtune::pretrain — causal-LM pretraining on raw text: documents are read from text/jsonl
// corpora, filtered (length, exact and MinHash near-duplicates, language id through Debian's
// libcld2, perplexity under a scoring model), tokenized once on every core into a memory-mapped
// cache, cut into sequence_len windows (optionally with per-document attention masks) and fed to
// the one training loop; plus SentencePiece tokenizer training with an HF tokenizer.json writer.
// Caveats: near-dedup keeps a MinHash signature per kept document in memory (4 * num_perm bytes);
// the language filter needs libcld2.so.0 at run time (loaded with dlopen, no build dependency).
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "train/train.h"

namespace llmtune::tok {
class Tokenizer;
}
namespace llmtune::config {
struct Recipe;
}

namespace llmtune::pretrain {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Filters (recipe key `filters:`), applied in this order; a document is counted under the first
// filter that removes it.
struct FilterConfig {
  int64_t min_chars = 0, max_chars = 0;  // length bounds in bytes after trimming; 0 = no bound
  int64_t min_words = 0;                 // whitespace-separated words; 0 = no bound
  bool dedup = false;                    // exact duplicates (64-bit hash of the trimmed text)
  struct NearDedup {
    bool enabled = false;
    double threshold = 0.8;  // estimated Jaccard similarity of word n-gram sets that counts as duplicate
    int num_perm = 128;      // MinHash permutations (signature length)
    int ngram = 5;           // words per shingle
    int bands = 16;          // LSH bands (num_perm / bands rows each); candidates are verified by threshold
    uint64_t seed = 1;
  } near_dedup;
  struct Language {
    bool enabled = false;
    std::vector<std::string> allow;  // ISO codes as cld2 reports them ("en", "fr", ...)
    bool drop_unreliable = false;    // also drop documents whose detection cld2 calls unreliable
  } language;
  struct Perplexity {
    bool enabled = false;
    std::string model;           // HF checkpoint dir (its tokenizer scores the text)
    double drop_fraction = 0.1;  // the worst (highest perplexity) fraction is removed
    int64_t max_tokens = 256;    // score the first N tokens of each document
  } perplexity;

  // Parses the recipe's `filters:` map; unknown keys -> Error naming the closest one.
  static FilterConfig from_json(const nlohmann::json& j, const std::string& where = "filters");
  nlohmann::json to_json() const;
  bool any() const;
};

// What each filter removed. Written to output_dir/filter_report.json and printed.
struct FilterReport {
  int64_t documents_in = 0, documents_out = 0;
  int64_t bytes_in = 0, bytes_out = 0;
  std::vector<std::pair<std::string, int64_t>> removed;  // filter name -> documents, in filter order
  double perplexity_threshold = 0;                       // documents above it were dropped (0 = none)
  int64_t removed_by(const std::string& name) const;
  std::string to_string() const;
  nlohmann::json to_json() const;
  static FilterReport from_json(const nlohmann::json& j);
};

// 64-bit FNV-1a followed by a splitmix64 finaliser (stable across platforms).
uint64_t hash64(std::string_view bytes, uint64_t seed = 0);
// MinHash signature of the set of `ngram`-word shingles (words = maximal runs of non-space bytes,
// lower-cased ASCII); documents shorter than `ngram` words use one shingle of all their words.
std::vector<uint32_t> minhash_signature(std::string_view text, int num_perm, int ngram, uint64_t seed);
// Fraction of equal signature slots: an unbiased estimate of the Jaccard similarity.
double minhash_similarity(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b);

// LSH index over signatures: insert() returns true when the document is new (and keeps it),
// false when an indexed document's estimated similarity reaches the threshold.
class MinHashIndex {
 public:
  MinHashIndex(int num_perm, int bands, double threshold);
  bool insert(std::vector<uint32_t> signature);
  size_t size() const { return signatures_.size(); }

 private:
  int num_perm_, bands_, rows_;
  double threshold_;
  std::vector<std::vector<uint32_t>> signatures_;
  std::vector<std::unordered_multimap<uint64_t, uint32_t>> buckets_;  // per band: band hash -> doc
};

// Language identification through libcld2 (Debian package libcld2-0), loaded on first use.
struct LanguageGuess {
  std::string code;  // "en", "fr", "un" (unknown)
  bool reliable = false;
};
// False (and *why) when libcld2.so.0 cannot be loaded.
bool language_id_available(std::string* why = nullptr);
LanguageGuess detect_language(std::string_view text);  // Error if unavailable

// The streaming filters (everything but perplexity). check() returns "" when the document is
// kept, else the name of the filter that removed it ("min_chars", "dedup", "near_dedup", ...).
class DocumentFilter {
 public:
  explicit DocumentFilter(const FilterConfig& config);
  std::string check(std::string_view doc);
  const FilterConfig& config() const { return config_; }

 private:
  FilterConfig config_;
  std::unordered_set<uint64_t> seen_;
  std::unique_ptr<MinHashIndex> near_;
};

// ---------------------------------------------------------------------------------------------
// Corpora and the token cache.

struct CorpusSource {
  std::string path;                // .txt, .jsonl, .json (array) or a directory of them
  std::string format = "auto";     // auto (by extension) | text | jsonl | json
  std::string text_split = "paragraph";  // text files: line | paragraph | file
  std::string field = "text";      // jsonl/json: the text field
};
// Reads documents one at a time (text and jsonl are streamed; a .json array is parsed whole).
// Empty documents (after trimming) are skipped. Error names the file and line of bad records.
void for_each_document(const CorpusSource& source, const std::function<void(std::string&& doc)>& fn);

struct CacheOptions {
  std::vector<CorpusSource> sources;
  FilterConfig filters;
  fs::path cache_root;     // the cache goes to cache_root/pretrain-<key>/
  int threads = 0;         // tokenizer threads; 0 = all cores
  bool add_eos = true;     // documents end with EOS (BOS comes from the tokenizer's own rule)
  int64_t chunk_bytes = 8 << 20;  // text tokenized per batch (bounds memory while streaming)
};

// A finished cache, memory-mapped read-only: tokens (uint16 when the vocabulary fits, else int32)
// and int64 document offsets. Files: tokens.bin, docs.bin, meta.json (written last).
class TokenCache {
 public:
  static TokenCache open(const fs::path& dir);  // Error if incomplete or corrupt
  TokenCache() = default;
  TokenCache(TokenCache&&) noexcept;
  TokenCache& operator=(TokenCache&&) noexcept;
  ~TokenCache();
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_documents() const { return num_docs_; }
  int32_t token(int64_t i) const;
  void read(int64_t start, int64_t count, int64_t* out) const;  // tokens [start, start+count)
  int64_t document_start(int64_t doc) const { return docs_[doc]; }  // docs_[num_documents] = num_tokens
  // Index of the document containing token position `pos`.
  int64_t document_of(int64_t pos) const;
  const nlohmann::json& meta() const { return meta_; }
  const fs::path& dir() const { return dir_; }

 private:
  fs::path dir_;
  nlohmann::json meta_;
  int64_t num_tokens_ = 0, num_docs_ = 0;
  int token_bytes_ = 4;
  void* tokens_map_ = nullptr;
  size_t tokens_len_ = 0;
  void* docs_map_ = nullptr;
  size_t docs_len_ = 0;
  const int64_t* docs_ = nullptr;
};

struct CacheBuild {
  fs::path dir;
  bool hit = false;
  FilterReport report;
  double seconds = 0;
};
// Builds the cache once (filters, then tokenization on every core, streamed to disk through a
// temp dir and a rename), or reuses it when the key (sources' paths/sizes/mtimes, tokenizer
// files, filter settings) matches. The perplexity filter makes a scoring pass first.
CacheBuild build_cache(const CacheOptions& options, const tok::Tokenizer& tokenizer);
std::string cache_key(const CacheOptions& options, const tok::Tokenizer& tokenizer);

// ---------------------------------------------------------------------------------------------
// Windows -> batches: the token stream is cut into non-overlapping windows of sequence_len tokens
// (the tail shorter than a window is dropped); each epoch visits the windows in a seeded order.
// labels = input_ids (every token is a target). With document_mask, segment_ids number the
// documents inside a window, position_ids restart at each document, and a document's first token
// is not a target (it would be predicted across the boundary).
struct WindowOptions {
  int64_t sequence_len = 512;
  int64_t batch_size = 1;
  bool document_mask = false;
  bool shuffle = true;
  uint64_t seed = 42;
  int rank = 0, world_size = 1;   // rank r takes batches r, r + world, ... of the epoch's order
  int64_t first_window = 0;       // the window range this source covers (train/held-out split)
  int64_t num_windows = -1;       // -1 = to the end
};

class WindowSource : public train::BatchSource {
 public:
  WindowSource(std::shared_ptr<const TokenCache> cache, WindowOptions options);
  void set_epoch(int64_t epoch) override;
  std::optional<train::Batch> next() override;
  int64_t batches_per_epoch() const override;
  nlohmann::json state() const override;
  void load_state(const nlohmann::json& state) override;
  int64_t num_windows() const { return num_windows_; }
  train::Batch batch_of_windows(const std::vector<int64_t>& windows) const;  // absolute window ids

 private:
  std::shared_ptr<const TokenCache> cache_;
  WindowOptions o_;
  int64_t num_windows_ = 0, epoch_ = 0, index_ = 0;
  std::vector<int64_t> order_;  // window ids (relative to first_window) in this epoch's order
};
// Windows of sequence_len in a cache of n tokens.
inline int64_t windows_in(int64_t num_tokens, int64_t sequence_len) { return num_tokens / sequence_len; }

// ---------------------------------------------------------------------------------------------
// The stage.
// dry_run builds/verifies the token cache and prints the plan without training.
using PretrainOptions = train::StageOptions;
// `llmtune pretrain`: model from base_model (continued pretraining) or random init (random_init_weights,
// shape from base_model_config / base_model's config.json / model_config), tokenizer from tokenizer_config
// or base_model, data from pretraining_dataset (or datasets), causal-LM loss on every token, full
// training; writes config.json + model.safetensors + tokenizer files + filter_report.json.
int run_pretrain(const config::Recipe& recipe, const PretrainOptions& options = {});

// The pretrain settings of a recipe that the stage reads (exposed for tests).
std::vector<CorpusSource> corpus_sources(const config::Recipe& recipe, bool test_sets = false);

// ---------------------------------------------------------------------------------------------
// Tokenizer training (`llmtune tokenizer train`).
struct TokenizerTrainOptions {
  std::vector<fs::path> inputs;   // text files; one sentence per line
  int64_t vocab_size = 8000;
  std::string type = "bpe";       // bpe | unigram
  fs::path out;
  double character_coverage = 1.0;  // 1.0 with byte fallback: rare characters become bytes
  int64_t input_sentence_size = 0;  // 0 = every line (deterministic); > 0 = a sample of that many
  int64_t max_sentence_length = 16384;
  int threads = 0;                  // 0 = all cores
  // Extra tokens matched in text and marked special in tokenizer.json (ids 3, 4, ...).
  std::vector<std::string> user_symbols = {"<|im_start|>", "<|im_end|>"};
  std::string chat_template = "chatml";  // built-in name or Jinja source for tokenizer_config.json
  int64_t model_max_length = 2048;
};
struct TokenizerTrainResult {
  int64_t vocab_size = 0;
  double seconds = 0;
  std::vector<fs::path> files;
};
TokenizerTrainResult train_tokenizer(const TokenizerTrainOptions& options);
// The HF tokenizer.json equivalent of a Llama-style SentencePiece model (BPE with merges derived
// from the vocabulary, or Unigram with scores; byte fallback; "▁" normalizer; BOS post-processor).
nlohmann::json sentencepiece_to_tokenizer_json(const fs::path& model_file, const std::string& type,
                                               const std::vector<std::string>& user_symbols);

}  // namespace llmtune::pretrain
