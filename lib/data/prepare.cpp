// The preparation pipeline: per dataset entry, read -> format+tokenize on every core -> drop/truncate
// long examples -> cache on disk; then concatenate, split off the validation set (seeded), apply mixing
// weights, and summarise. The cache key covers everything that changes the tokens of one entry; mixing,
// splitting and batching happen after the cache so changing them never re-tokenizes.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "core/core.h"
#include "data/data_impl.h"

namespace llmtune::data {
namespace {

constexpr int kFormatVersion = 1;  // bump when tokenization/masking logic changes

std::string file_fingerprint(const std::filesystem::path& p) {
  std::error_code ec;
  auto size = std::filesystem::file_size(p, ec);
  if (ec) fail("dataset file {} does not exist; check `path:` in the recipe's datasets list", p.string());
  auto mtime = std::filesystem::last_write_time(p, ec).time_since_epoch().count();
  if (size <= (64u << 20)) {
    std::ifstream f(p, std::ios::binary);
    std::ostringstream ss;
    ss << f.rdbuf();
    return "content:" + hash_hex(ss.str());
  }
  // Large files: identity by absolute path, size and modification time (hashing GBs costs seconds).
  return fmt::format("stat:{}:{}:{}", std::filesystem::absolute(p).string(), size, mtime);
}

int thread_count(int requested) {
  if (requested > 0) return requested;
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

struct Tokenized {
  TokenizedDataset data;
  DatasetCounts counts;
};

Tokenized tokenize_entry(const DatasetSpec& spec, uint16_t source, const DataOptions& o, const RecordFormatter& fmtr) {
  Tokenized out;
  auto& c = out.counts;
  ReadOptions ro;
  ro.format = spec.ds_type.empty() ? "auto" : spec.ds_type;
  ro.text_split = spec.text_split;
  ro.text_field = spec.field;
  ro.skip_invalid = o.skip_invalid;
  RecordSet rs = read_records(spec.path, ro);
  c.records = static_cast<int64_t>(rs.records.size());
  c.invalid_skipped = rs.skipped_invalid;

  // Format + tokenize in parallel; results land per record so output order = file order.
  const size_t n = rs.records.size();
  std::vector<std::vector<Example>> results(n);
  std::vector<std::string> errors(n);
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  auto worker = [&] {
    constexpr size_t kBlock = 32;
    while (!stop) {
      size_t b = next.fetch_add(kBlock);
      if (b >= n) break;
      for (size_t i = b; i < std::min(n, b + kBlock); ++i) {
        try {
          results[i] = fmtr.format(rs.records[i], rs.where(i));
        } catch (const std::exception& e) {
          errors[i] = e.what();
          if (!o.skip_invalid) stop = true;
        }
      }
    }
  };
  int nt = std::min<int>(thread_count(o.num_threads), static_cast<int>(std::max<size_t>(n / 16, 1)));
  std::vector<std::thread> pool;
  for (int t = 1; t < nt; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();

  for (size_t i = 0; i < n; ++i) {
    if (!errors[i].empty()) {
      // Report the first failing record in file order (threads may have found a later one first).
      if (!o.skip_invalid) throw Error(errors[i] + (errors[i].find("skip_invalid") == std::string::npos
                                                        ? " (or set skip_invalid: true to skip such records)"
                                                        : ""));
      ++c.invalid_skipped;
      log::debug(fmt::format("skipped: {}", errors[i]));
      continue;
    }
    if (results[i].size() > 1) c.chunks_split += 1;
    for (auto& ex : results[i]) {
      int64_t len = static_cast<int64_t>(ex.input_ids.size());
      if (len > o.sequence_len) {
        if (o.excess_length_strategy == "truncate") {
          ex.input_ids.resize(o.sequence_len);
          ex.trained.resize(o.sequence_len);
          ++c.truncated;
          len = o.sequence_len;
        } else {
          ++c.dropped_long;
          continue;
        }
      }
      if (len < o.min_sample_len) {
        ++c.dropped_short;
        continue;
      }
      // The first token's label is never used (nothing predicts it), so it must not be the only one.
      bool any = std::any_of(ex.trained.begin() + 1, ex.trained.end(), [](uint8_t t) { return t != 0; });
      if (!any) {
        ++c.dropped_untrained;
        continue;
      }
      out.data.add(ex.input_ids, ex.trained, source);
    }
  }
  return out;
}

void fill_totals(DatasetCounts& c, const TokenizedDataset& d) {
  c.examples = static_cast<int64_t>(d.size());
  c.tokens = d.num_tokens();
  c.trained_tokens = d.num_trained();
}

nlohmann::json counts_json(const DatasetCounts& c) {
  return {{"path", c.path},           {"type", c.type},
          {"records", c.records},     {"invalid_skipped", c.invalid_skipped},
          {"examples", c.examples},   {"dropped_long", c.dropped_long},
          {"truncated", c.truncated}, {"dropped_short", c.dropped_short},
          {"dropped_untrained", c.dropped_untrained}, {"chunks_split", c.chunks_split},
          {"tokens", c.tokens},       {"trained_tokens", c.trained_tokens},
          {"cache", c.cache},         {"cache_file", c.cache_file}};
}

void counts_from_json(DatasetCounts& c, const nlohmann::json& j) {
  c.records = j.value("records", int64_t{0});
  c.invalid_skipped = j.value("invalid_skipped", int64_t{0});
  c.dropped_long = j.value("dropped_long", int64_t{0});
  c.truncated = j.value("truncated", int64_t{0});
  c.dropped_short = j.value("dropped_short", int64_t{0});
  c.dropped_untrained = j.value("dropped_untrained", int64_t{0});
  c.chunks_split = j.value("chunks_split", int64_t{0});
}

}  // namespace

std::string PrepareSummary::to_string() const {
  std::string s = "datasets:\n";
  for (const auto& d : datasets) {
    s += fmt::format("  {} ({}): {} records -> {} examples, {} tokens ({} trained); cache {}\n", d.path, d.type,
                     d.records, d.examples, d.tokens, d.trained_tokens, d.cache);
    std::vector<std::string> notes;
    if (d.invalid_skipped) notes.push_back(fmt::format("{} invalid skipped", d.invalid_skipped));
    if (d.dropped_long) notes.push_back(fmt::format("{} longer than sequence_len dropped", d.dropped_long));
    if (d.truncated) notes.push_back(fmt::format("{} truncated to sequence_len", d.truncated));
    if (d.dropped_short) notes.push_back(fmt::format("{} too short dropped", d.dropped_short));
    if (d.dropped_untrained) notes.push_back(fmt::format("{} with no trained token dropped", d.dropped_untrained));
    if (d.chunks_split) notes.push_back(fmt::format("{} documents split into sequence_len chunks", d.chunks_split));
    if (!notes.empty()) {
      s += "    ";
      for (size_t i = 0; i < notes.size(); ++i) s += (i ? ", " : "") + notes[i];
      s += "\n";
    }
  }
  s += fmt::format("  train: {} examples, {} tokens ({} trained)", train_examples, train_tokens, train_trained_tokens);
  if (val_examples) s += fmt::format("; validation: {} examples, {} tokens", val_examples, val_tokens);
  s += fmt::format("; prepared in {:.2f}s", seconds);
  return s;
}

nlohmann::json PrepareSummary::to_json() const {
  nlohmann::json j;
  j["datasets"] = nlohmann::json::array();
  for (const auto& d : datasets) j["datasets"].push_back(counts_json(d));
  j["train_examples"] = train_examples;
  j["val_examples"] = val_examples;
  j["train_tokens"] = train_tokens;
  j["train_trained_tokens"] = train_trained_tokens;
  j["val_tokens"] = val_tokens;
  j["cache_hits"] = cache_hits;
  j["cache_misses"] = cache_misses;
  j["seconds"] = seconds;
  return j;
}

PreparedData prepare(const DataOptions& o, const tok::Tokenizer& tokenizer, const tok::ChatTemplate* template_) {
  double t0 = now_seconds();
  if (o.datasets.empty()) fail("the recipe has no datasets; add a `datasets:` list with at least one path");
  if (o.sequence_len < 2) fail("sequence_len must be at least 2 (got {})", o.sequence_len);
  if (o.excess_length_strategy != "drop" && o.excess_length_strategy != "truncate")
    fail("excess_length_strategy: `{}` is not one of drop, truncate", o.excess_length_strategy);
  if (o.datasets.size() > 65535) fail("too many dataset entries ({}; at most 65535)", o.datasets.size());
  PrepareSummary summary;
  std::filesystem::path cache_dir =
      o.dataset_prepared_path.empty() ? default_cache_dir() : std::filesystem::path(o.dataset_prepared_path);
  std::string tok_fp = o.use_cache ? detail::fingerprint(tokenizer) : "";

  std::vector<TokenizedDataset> parts;
  for (size_t di = 0; di < o.datasets.size(); ++di) {
    const DatasetSpec& spec = o.datasets[di];
    RecordFormatter fmtr(spec, o, tokenizer, template_);
    DatasetCounts counts;
    counts.path = spec.path;
    counts.type = spec.type;
    std::optional<TokenizedDataset> data;
    std::filesystem::path file;
    if (o.use_cache) {
      // Everything that changes this entry's tokens: file, tokenizer, template/eot (describe), settings.
      nlohmann::json key = {{"version", kFormatVersion},
                            {"file", file_fingerprint(spec.path)},
                            {"tokenizer", tok_fp},
                            {"formatter", fmtr.describe()},
                            {"source", di},
                            {"ds_type", spec.ds_type},
                            {"text_split", spec.text_split},
                            {"fields", {spec.field_instruction, spec.field_input, spec.field_output, spec.field,
                                        spec.field_messages, spec.field_system}},
                            {"mappings", spec.message_property_mappings},
                            {"drop_system", spec.drop_system_message},
                            {"sequence_len", o.sequence_len},
                            {"train_on_inputs", o.train_on_inputs},
                            {"excess", o.excess_length_strategy},
                            {"min_len", o.min_sample_len},
                            {"skip_invalid", o.skip_invalid}};
      std::string h = hash_hex(key.dump());
      file = cache_dir / fmt::format("{}-{}.llmtds", std::filesystem::path(spec.path).stem().string(), h.substr(0, 24));
      counts.cache_file = file.string();
      nlohmann::json meta;
      data = load_cache(file, &meta);
      if (data && meta.value("key", "") == h) {
        counts_from_json(counts, meta.value("counts", nlohmann::json::object()));
        counts.cache = "hit";
        ++summary.cache_hits;
      } else {
        data.reset();
        auto t = tokenize_entry(spec, static_cast<uint16_t>(di), o, fmtr);
        fill_totals(t.counts, t.data);
        nlohmann::json m = {{"key", h}, {"counts", counts_json(t.counts)}, {"spec_path", spec.path}};
        save_cache(file, t.data, m);
        t.counts.path = counts.path;
        t.counts.type = counts.type;
        t.counts.cache_file = counts.cache_file;
        counts = t.counts;
        counts.cache = "miss";
        ++summary.cache_misses;
        data = std::move(t.data);
      }
    } else {
      auto t = tokenize_entry(spec, static_cast<uint16_t>(di), o, fmtr);
      t.counts.path = counts.path;
      t.counts.type = counts.type;
      counts = t.counts;
      counts.cache = "off";
      data = std::move(t.data);
    }
    fill_totals(counts, *data);
    if (data->size() == 0)
      log::warn(fmt::format("dataset {} produced no examples ({} records; see the counts below)", spec.path, counts.records));
    summary.datasets.push_back(counts);
    parts.push_back(std::move(*data));
  }

  // Concatenate, then split off validation examples with a seeded permutation (before any up-sampling, so
  // repeated examples never straddle train and validation).
  TokenizedDataset all;
  for (const auto& p : parts)
    for (size_t i = 0; i < p.size(); ++i) all.append(p, i);
  parts.clear();
  const int64_t n = static_cast<int64_t>(all.size());
  int64_t n_val = 0;
  if (o.val_set_size > 0) {
    n_val = o.val_set_size < 1 ? static_cast<int64_t>(std::ceil(o.val_set_size * static_cast<double>(n)))
                               : static_cast<int64_t>(o.val_set_size);
    if (n_val >= n)
      fail("val_set_size {} leaves no training examples ({} examples in total); lower it", o.val_set_size, n);
  }
  std::vector<uint8_t> is_val(static_cast<size_t>(n), 0);
  if (n_val > 0) {
    auto perm = permutation(n, derive_seed(o.seed, 0x76616C, 0));  // "val"
    for (int64_t k = 0; k < n_val; ++k) is_val[perm[k]] = 1;
  }
  auto train = std::make_shared<TokenizedDataset>();
  auto val = std::make_shared<TokenizedDataset>();
  std::vector<std::vector<int64_t>> train_by_source(o.datasets.size());
  for (int64_t i = 0; i < n; ++i) {
    if (is_val[i]) val->append(all, i);
    else train_by_source[all.source[i]].push_back(i);
  }
  // Mixing weights: integer part repeats every example, the fraction takes a seeded subset.
  for (size_t s = 0; s < train_by_source.size(); ++s) {
    double w = o.datasets[s].weight;
    if (!(w >= 0)) fail("dataset {}: weight must be >= 0 (got {})", o.datasets[s].path, w);
    const auto& idx = train_by_source[s];
    int64_t whole = static_cast<int64_t>(std::floor(w));
    for (int64_t r = 0; r < whole; ++r)
      for (int64_t i : idx) train->append(all, i);
    double frac = w - static_cast<double>(whole);
    if (frac > 0) {
      int64_t take = static_cast<int64_t>(std::llround(frac * static_cast<double>(idx.size())));
      auto perm = permutation(static_cast<int64_t>(idx.size()), derive_seed(o.seed, 0x6D6978, s));  // "mix"
      std::vector<int64_t> chosen(perm.begin(), perm.begin() + take);
      std::sort(chosen.begin(), chosen.end());
      for (int64_t k : chosen) train->append(all, idx[k]);
    }
  }
  if (train->size() == 0)
    fail("no training examples are left after preparation; see the counts:\n{}", summary.to_string());
  summary.train_examples = static_cast<int64_t>(train->size());
  summary.train_tokens = train->num_tokens();
  summary.train_trained_tokens = train->num_trained();
  summary.val_examples = static_cast<int64_t>(val->size());
  summary.val_tokens = val->num_tokens();
  summary.seconds = now_seconds() - t0;
  return PreparedData{std::move(train), std::move(val), std::move(summary)};
}

}  // namespace llmtune::data
