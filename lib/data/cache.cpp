// Tokenized-dataset storage and its on-disk cache. File layout (little-endian):
//   "LLMTDS01" | u64 n_examples | u64 n_tokens | u64 meta_len | meta JSON (counts, key) |
//   i64 offsets[n+1] | i32 tokens[n_tokens] | u16 source[n] | u8 label bits[(n_tokens+7)/8] | "LLMTDEND"
// Written to a temporary file in the same directory and renamed, so a reader never sees half a file.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/core.h"
#include "data/data.h"

namespace llmtune::data {

std::span<const int32_t> TokenizedDataset::ids(size_t i) const {
  return {tokens.data() + offsets[i], static_cast<size_t>(offsets[i + 1] - offsets[i])};
}

std::vector<int32_t> TokenizedDataset::labels(size_t i) const {
  std::vector<int32_t> out(static_cast<size_t>(length(i)));
  for (int64_t k = offsets[i]; k < offsets[i + 1]; ++k) out[k - offsets[i]] = trained[k] ? tokens[k] : kIgnoreIndex;
  return out;
}

int64_t TokenizedDataset::num_trained() const {
  int64_t n = 0;
  for (uint8_t t : trained) n += t;
  return n;
}

void TokenizedDataset::add(std::span<const int32_t> ids, std::span<const uint8_t> tr, uint16_t src) {
  tokens.insert(tokens.end(), ids.begin(), ids.end());
  trained.insert(trained.end(), tr.begin(), tr.end());
  offsets.push_back(static_cast<int64_t>(tokens.size()));
  source.push_back(src);
}

void TokenizedDataset::append(const TokenizedDataset& other, size_t i) {
  auto b = other.offsets[i], e = other.offsets[i + 1];
  tokens.insert(tokens.end(), other.tokens.begin() + b, other.tokens.begin() + e);
  trained.insert(trained.end(), other.trained.begin() + b, other.trained.begin() + e);
  offsets.push_back(static_cast<int64_t>(tokens.size()));
  source.push_back(i < other.source.size() ? other.source[i] : 0);
}

std::vector<int32_t> Example::labels() const {
  std::vector<int32_t> out(input_ids.size());
  for (size_t k = 0; k < input_ids.size(); ++k) out[k] = trained[k] ? input_ids[k] : kIgnoreIndex;
  return out;
}

std::filesystem::path default_cache_dir() {
  if (const char* c = std::getenv("LLMTUNE_CACHE"); c && *c) return std::filesystem::path(c) / "datasets";
  if (const char* h = std::getenv("HOME"); h && *h) return std::filesystem::path(h) / ".cache/llmtune/datasets";
  return std::filesystem::temp_directory_path() / "llmtune-datasets";
}

namespace {
constexpr char kMagic[8] = {'L', 'L', 'M', 'T', 'D', 'S', '0', '1'};
constexpr char kEnd[8] = {'L', 'L', 'M', 'T', 'D', 'E', 'N', 'D'};

struct File {
  FILE* f = nullptr;
  ~File() {
    if (f) std::fclose(f);
  }
};
}  // namespace

void save_cache(const std::filesystem::path& file, const TokenizedDataset& d, const nlohmann::json& meta) {
  std::error_code ec;
  std::filesystem::create_directories(file.parent_path(), ec);
  if (ec) fail("cannot create the dataset cache directory {} ({}); set dataset_prepared_path to a writable folder",
               file.parent_path().string(), ec.message());
  auto tmp = file;
  tmp += fmt::format(".tmp.{}", static_cast<long>(::getpid()));
  std::string m = meta.dump();
  uint64_t n = d.size(), nt = d.tokens.size(), ml = m.size();
  std::vector<uint8_t> bits((nt + 7) / 8, 0);
  for (uint64_t k = 0; k < nt; ++k)
    if (d.trained[k]) bits[k >> 3] |= static_cast<uint8_t>(1u << (k & 7));
  std::vector<uint16_t> source(d.source);
  source.resize(n, 0);
  {
    File out{std::fopen(tmp.c_str(), "wb")};
    if (!out.f) fail("cannot write dataset cache {} ; set dataset_prepared_path to a writable folder", tmp.string());
    bool ok = std::fwrite(kMagic, 1, 8, out.f) == 8 && std::fwrite(&n, 8, 1, out.f) == 1 &&
              std::fwrite(&nt, 8, 1, out.f) == 1 && std::fwrite(&ml, 8, 1, out.f) == 1 &&
              std::fwrite(m.data(), 1, ml, out.f) == ml &&
              std::fwrite(d.offsets.data(), 8, n + 1, out.f) == n + 1 &&
              std::fwrite(d.tokens.data(), 4, nt, out.f) == nt && std::fwrite(source.data(), 2, n, out.f) == n &&
              std::fwrite(bits.data(), 1, bits.size(), out.f) == bits.size() && std::fwrite(kEnd, 1, 8, out.f) == 8;
    ok = (std::fflush(out.f) == 0) && ok;
    if (!ok) {
      std::filesystem::remove(tmp, ec);
      fail("writing dataset cache {} failed (disk full?)", tmp.string());
    }
  }
  std::filesystem::rename(tmp, file, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    fail("cannot move the dataset cache into place at {}", file.string());
  }
}

std::optional<TokenizedDataset> load_cache(const std::filesystem::path& file, nlohmann::json* meta) {
  File in{std::fopen(file.c_str(), "rb")};
  if (!in.f) return std::nullopt;
  char magic[8];
  uint64_t n = 0, nt = 0, ml = 0;
  if (std::fread(magic, 1, 8, in.f) != 8 || std::memcmp(magic, kMagic, 8) != 0) return std::nullopt;
  if (std::fread(&n, 8, 1, in.f) != 1 || std::fread(&nt, 8, 1, in.f) != 1 || std::fread(&ml, 8, 1, in.f) != 1)
    return std::nullopt;
  std::error_code ec;
  uint64_t fsize = std::filesystem::file_size(file, ec);
  uint64_t expect = 32 + ml + 8 * (n + 1) + 4 * nt + 2 * n + (nt + 7) / 8 + 8;
  if (ec || fsize != expect) return std::nullopt;  // truncated or foreign: rebuild
  std::string m(ml, '\0');
  TokenizedDataset d;
  d.offsets.resize(n + 1);
  d.tokens.resize(nt);
  d.source.resize(n);
  std::vector<uint8_t> bits((nt + 7) / 8);
  char end[8];
  if (std::fread(m.data(), 1, ml, in.f) != ml || std::fread(d.offsets.data(), 8, n + 1, in.f) != n + 1 ||
      std::fread(d.tokens.data(), 4, nt, in.f) != nt || std::fread(d.source.data(), 2, n, in.f) != n ||
      std::fread(bits.data(), 1, bits.size(), in.f) != bits.size() || std::fread(end, 1, 8, in.f) != 8 ||
      std::memcmp(end, kEnd, 8) != 0)
    return std::nullopt;
  if (d.offsets.front() != 0 || static_cast<uint64_t>(d.offsets.back()) != nt) return std::nullopt;
  d.trained.resize(nt);
  for (uint64_t k = 0; k < nt; ++k) d.trained[k] = (bits[k >> 3] >> (k & 7)) & 1;
  if (meta) {
    try {
      *meta = nlohmann::json::parse(m);
    } catch (const nlohmann::json::exception&) {
      return std::nullopt;
    }
  }
  return d;
}

}  // namespace llmtune::data
