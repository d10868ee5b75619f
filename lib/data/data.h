// llmtune::data — from dataset files to training batches: readers (jsonl/json/csv/txt), the Axolotl
// dataset types (alpaca, chat_template, completion, input_output) with exact label masks, long-example
// handling, mixing, a seeded val split, an on-disk token cache, sample packing and a resumable batch stream.
// Caveat: labels are unshifted (HF convention) and are always either the token itself or -100.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "train/batch.h"

namespace llmtune::tok {
class Tokenizer;
class ChatTemplate;
}  // namespace llmtune::tok

namespace llmtune::config {
struct Recipe;
}

namespace llmtune::data {

inline constexpr int32_t kIgnoreIndex = -100;

// ---------------------------------------------------------------------------------------------
// Readers: every format becomes a list of JSON objects (one per record) remembering where each came from.

struct ReadOptions {
  std::string format = "auto";     // auto (by extension) | jsonl | json | csv | text
  std::string text_split = "line";  // text files: line | paragraph (blank-line separated) | file (one document)
  std::string text_field = "text";  // field name given to text-file documents
  bool skip_invalid = false;        // malformed lines/rows: skip and count instead of failing
};

struct RecordSet {
  std::string source;                  // file name as shown in messages ("data.jsonl")
  std::vector<nlohmann::json> records;  // each a JSON object
  std::vector<int64_t> lines;          // 1-based line where each record starts (0 if unknown, e.g. JSON arrays)
  int64_t skipped_invalid = 0;
  // "record 12 of data.jsonl (line 14)" — 0-based index in `records`.
  std::string where(size_t i) const;
};

RecordSet read_records(const std::filesystem::path& path, const ReadOptions& options = {});
// Same, from text in memory; `name` picks the format when options.format is "auto".
RecordSet parse_records(const std::string& text, const std::string& name, const ReadOptions& options = {});

// ---------------------------------------------------------------------------------------------
// Settings: one DatasetSpec per recipe `datasets:` entry (Axolotl names), DataOptions for the rest.

struct DatasetSpec {
  std::string path;
  std::string type = "alpaca";  // alpaca | chat_template | completion | input_output
  std::string ds_type;          // file format override: json | jsonl | csv | text ("" = by extension)
  std::string text_split = "line";
  // alpaca
  std::string field_instruction = "instruction", field_input = "input", field_output = "output";
  // completion
  std::string field = "text";
  // chat_template
  std::string field_messages = "messages";  // falls back to "conversations" (ShareGPT) when absent
  std::string field_system = "system";      // top-level system prompt prepended when present
  std::map<std::string, std::string> message_property_mappings;  // {role: from, content: value}
  std::map<std::string, std::vector<std::string>> roles;          // {assistant: [gpt, assistant], ...}
  std::optional<std::vector<std::string>> roles_to_train;         // default: DataOptions::roles_to_train
  std::optional<std::string> train_on_eos;                        // all | turn | last | none
  std::optional<std::string> train_on_eot;                        // default: train_on_eos
  bool drop_system_message = false;
  std::optional<std::string> chat_template;                       // per-dataset override (name or Jinja)
  // mixing: multiplies this dataset's share of each epoch (0.5 = a seeded half, 2 = every example twice).
  double weight = 1.0;
};

struct DataOptions {
  std::vector<DatasetSpec> datasets;
  int64_t sequence_len = 2048;
  bool train_on_inputs = false;
  std::string train_on_eos = "turn";  // all | turn | last | none (Axolotl chat_template default "turn")
  std::optional<std::string> train_on_eot;  // EOT tokens; default: train_on_eos
  std::vector<std::string> roles_to_train = {"assistant"};
  std::vector<std::string> eot_tokens;   // end-of-turn token strings; default: the tokenizer's EOS plus the
                                         // special token the chat template puts after an assistant turn
  // builtin name, Jinja source, "tokenizer_default" or "tokenizer_default_fallback_<name>";
  // "" = the tokenizer's own template if it has one, else chatml.
  std::string chat_template;
  std::string excess_length_strategy = "drop";  // drop (Axolotl default) | truncate
  int64_t min_sample_len = 2;                   // shorter examples are dropped (Axolotl min_sample_len)
  bool skip_invalid = false;
  double val_set_size = 0;  // < 1: fraction of examples; >= 1: count
  uint64_t seed = 42;
  std::string dataset_prepared_path;  // cache dir; "" = $LLMTUNE_CACHE/datasets or ~/.cache/llmtune/datasets
  bool use_cache = true;
  int num_threads = 0;  // 0 = all cores
};

// Builds DataOptions from a parsed recipe (the datasets list plus the top-level data keys).
DataOptions options_from_recipe(const config::Recipe& recipe);

// ---------------------------------------------------------------------------------------------
// Tokenized examples, stored flat: all tokens concatenated, one label bit per token.

struct TokenizedDataset {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> trained;  // 1 = label is the token, 0 = -100; one per token
  std::vector<int64_t> offsets = {0};  // example i = [offsets[i], offsets[i+1])
  std::vector<uint16_t> source;        // index of the DatasetSpec each example came from

  size_t size() const { return offsets.size() - 1; }
  int64_t length(size_t i) const { return offsets[i + 1] - offsets[i]; }
  std::span<const int32_t> ids(size_t i) const;
  std::vector<int32_t> labels(size_t i) const;  // token or -100
  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_trained() const;
  void add(std::span<const int32_t> ids, std::span<const uint8_t> trained, uint16_t source = 0);
  void append(const TokenizedDataset& other, size_t i);  // copy example i of other
};

// Counts from preparing one dataset entry.
struct DatasetCounts {
  std::string path, type;
  int64_t records = 0;          // records read
  int64_t invalid_skipped = 0;  // malformed lines or records (skip_invalid: true)
  int64_t examples = 0;         // examples kept (after chunking, drop and truncation)
  int64_t dropped_long = 0;     // longer than sequence_len, dropped
  int64_t truncated = 0;        // longer than sequence_len, cut to sequence_len
  int64_t dropped_short = 0;    // shorter than min_sample_len
  int64_t dropped_untrained = 0;  // no token carries a label
  int64_t chunks_split = 0;     // completion documents split into several sequence_len chunks
  int64_t tokens = 0, trained_tokens = 0;
  std::string cache;  // "hit", "miss" (written) or "off"
  std::string cache_file;
};

struct PrepareSummary {
  std::vector<DatasetCounts> datasets;
  int64_t train_examples = 0, val_examples = 0;
  int64_t train_tokens = 0, train_trained_tokens = 0, val_tokens = 0;
  int64_t cache_hits = 0, cache_misses = 0;
  double seconds = 0;
  std::string to_string() const;  // the table printed before training
  nlohmann::json to_json() const;
};

struct PreparedData {
  std::shared_ptr<const TokenizedDataset> train, val;
  PrepareSummary summary;
};

// Reads, tokenizes (all cores), filters, caches, mixes and splits every dataset in `options`.
// `template_` overrides the chat template choice (else options.chat_template / the tokenizer's).
PreparedData prepare(const DataOptions& options, const tok::Tokenizer& tokenizer,
                     const tok::ChatTemplate* template_ = nullptr);

// One record -> one or more examples (completion documents are split into sequence_len chunks).
// Exposed for tests; no length filtering here. Throws llmtune::Error naming `where` on bad records.
struct Example {
  std::vector<int32_t> input_ids;
  std::vector<uint8_t> trained;
  std::vector<int32_t> labels() const;
};
struct Formatter;  // compiled per-dataset settings (data_impl.h)
class RecordFormatter {
 public:
  RecordFormatter(const DatasetSpec& spec, const DataOptions& options, const tok::Tokenizer& tokenizer,
                  const tok::ChatTemplate* template_ = nullptr);
  ~RecordFormatter();
  std::vector<Example> format(const nlohmann::json& record, const std::string& where) const;
  std::string describe() const;  // what goes into the cache key (template source, eot ids, ...)

 private:
  std::unique_ptr<Formatter> impl_;
};

// The Alpaca prompt text (Axolotl AlpacaPrompter), everything through "### Response:\n".
std::string alpaca_prompt(const std::string& instruction, const std::string& input);

// ---------------------------------------------------------------------------------------------
// Batches.

// The loop's batch type (lib/train/batch.h, header only): input_ids/labels/attention_mask/position_ids/
// segment_ids [B, T] int64, num_target_tokens, num_tokens. What this module puts in them:
//   labels: -100 where not trained, at padding, and at every example's first token (it would be predicted
//           across a packing boundary), so num_target_tokens = count(labels != -100) exactly;
//   position_ids restart at 0 for every example; segment_ids are 1..k per example within a row, 0 at padding;
//   attention_mask 1 on real tokens. With packing, attend only where segment ids are equal (and causal).
using Batch = train::Batch;

struct BatchOptions {
  int64_t batch_size = 1;  // rows per batch (micro_batch_size); with packing, rows of sequence_len
  int64_t sequence_len = 2048;
  bool sample_packing = false;
  bool group_by_length = true;   // without packing: sort within mega-batches, shuffle batch order
  int64_t mega_batch_mult = 50;  // mega-batch = mega_batch_mult * batch_size examples
  bool shuffle = true;           // false: dataset order (evaluation)
  bool drop_last = false;
  int64_t pad_to_multiple_of = 1;
  int32_t pad_id = 0;
  uint64_t seed = 42;
  int rank = 0, world_size = 1;  // every rank gets every world_size-th batch (same count on all ranks)
  int64_t packing_group_size = 100000;  // examples per first-fit-decreasing group
};

// Where the stream is; given the same state (and data/options) the same batches follow.
struct BatchState {
  int64_t epoch = 0;
  int64_t index = 0;  // next batch in this epoch (this rank's numbering)
  uint64_t seed = 42;
  int64_t world_size = 1;  // ranks that shared the epoch; a state from another world size is rescaled
  nlohmann::json to_json() const;
  static BatchState from_json(const nlohmann::json& j);
  bool operator==(const BatchState&) const = default;
};

struct PackingStats {
  int64_t rows = 0, real_tokens = 0, capacity = 0;
  double efficiency() const { return capacity ? double(real_tokens) / double(capacity) : 0.0; }
};

// Row layout of one batch: each row lists the example indices placed in it.
using BatchPlan = std::vector<std::vector<int64_t>>;

// Mirrors train::BatchSource (set_epoch / next / batches_per_epoch / state / load_state) so the loop can
// wrap it in a few lines; data does not depend on lib/train beyond the header-only Batch.
class BatchSource {
 public:
  BatchSource(std::shared_ptr<const TokenizedDataset> data, BatchOptions options);
  void set_epoch(int64_t epoch);      // start `epoch` from its first batch
  std::optional<Batch> next();         // nullopt at the end of the epoch
  int64_t batches_per_epoch() const;   // on this rank
  nlohmann::json state() const { return state_.to_json(); }
  void load_state(const nlohmann::json& j) { set_state(BatchState::from_json(j)); }
  BatchState batch_state() const { return state_; }
  void set_state(const BatchState& s);
  const BatchPlan& plan(int64_t batch_index);  // rows of a batch of the current epoch (this rank)
  PackingStats packing_stats();                // current epoch: real tokens / (rows * sequence_len)
  int64_t padding_tokens();                    // current epoch: sum over batches of B*T - real tokens
  const BatchOptions& options() const { return options_; }
  const TokenizedDataset& dataset() const { return *data_; }

 private:
  void ensure_epoch();
  std::shared_ptr<const TokenizedDataset> data_;
  BatchOptions options_;
  BatchState state_;
  int64_t planned_epoch_ = -1;
  uint64_t planned_seed_ = 0;
  std::vector<BatchPlan> epoch_plan_;  // this rank's batches
};

// Builds a padded/packed batch from rows of example indices. T = sequence_len when packing, else the
// longest row rounded up to pad_to_multiple_of.
Batch make_batch(const TokenizedDataset& data, const BatchPlan& rows, const BatchOptions& options);

// ---------------------------------------------------------------------------------------------
// Deterministic randomness, identical on every platform (no std::shuffle / std::uniform_int_distribution).

// Uniform integer in [0, n) from a std::mt19937_64 stream by rejection sampling.
uint64_t uniform_below(uint64_t n, std::mt19937_64& rng);
// Fisher–Yates permutation of [0, n) from std::mt19937_64(seed).
std::vector<int64_t> permutation(int64_t n, uint64_t seed);
// Mixes a seed with stream ids (epoch, purpose) into a new seed (splitmix64).
uint64_t derive_seed(uint64_t seed, uint64_t a, uint64_t b = 0);

// 128-bit content hash (two 64-bit lanes) used for cache keys; hex string.
std::string hash_hex(std::string_view bytes);

// Cache file I/O (exposed for tests): header + offsets + int32 tokens + label bits + counts JSON.
void save_cache(const std::filesystem::path& file, const TokenizedDataset& data, const nlohmann::json& meta);
std::optional<TokenizedDataset> load_cache(const std::filesystem::path& file, nlohmann::json* meta = nullptr);
std::filesystem::path default_cache_dir();

}  // namespace llmtune::data
