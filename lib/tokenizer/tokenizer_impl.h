// Internal pieces of llmtune::tok shared by the engines: UTF-8 and Unicode-property helpers
// (ICU-backed), regex pre-tokenization (hand-written matchers for the known GPT-2/Llama-3/Qwen2
// patterns, ICU for anything else), the GPT-2 byte alphabet, added-token splitting, and BPE.
// Not a public header: other modules include only tokenizer/tokenizer.h.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/core.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::tok::detail {

// ---- UTF-8 / Unicode -------------------------------------------------------------------------
// Decodes one code point at s[i] and advances i; invalid bytes yield U+FFFD and advance by one.
char32_t utf8_next(std::string_view s, size_t& i);
void utf8_append(std::string& out, char32_t cp);
// Bytes -> valid UTF-8, replacing each maximal invalid subsequence with U+FFFD (the rule of
// Rust's String::from_utf8_lossy, which the tokenizers library uses).
std::string utf8_lossy(std::string_view bytes);
bool utf8_valid(std::string_view bytes);

bool is_letter(char32_t c);        // \p{L}
bool is_number(char32_t c);        // \p{N} (also Rust char::is_numeric)
bool is_regex_space(char32_t c);   // Oniguruma \s: 9-13, U+0085, and Zs/Zl/Zp
bool is_white_space(char32_t c);   // Unicode White_Space (Rust char::is_whitespace)
bool is_alphanumeric(char32_t c);  // Rust char::is_alphanumeric: Alphabetic or \p{N}

enum class NormForm { nfc, nfd, nfkc, nfkd };
std::string unicode_normalize(std::string_view s, NormForm form);

// ---- GPT-2 byte <-> unicode alphabet ------------------------------------------------------------
const std::array<std::string, 256>& byte_to_unicode();  // UTF-8 of the char standing for each byte
int byte_from_unicode(char32_t c);                      // -1 if c is not in the alphabet

// ---- regex pre-tokenization --------------------------------------------------------------------
// Finds all non-overlapping matches (leftmost, alternatives in order, like Oniguruma's
// find_iter) of a pre-tokenizer regex, as byte ranges.
class RegexSplitter {
 public:
  explicit RegexSplitter(const std::string& pattern, bool force_icu = false);
  ~RegexSplitter();
  void find(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;
  bool uses_icu() const { return kind_ == Kind::icu; }
  static const std::string& gpt2_pattern();

 private:
  enum class Kind { gpt2, llama3, icu } kind_;
  int max_digits_ = 3;  // llama3: \p{N}{1,3}; qwen2: \p{N}
  struct Icu;
  std::unique_ptr<Icu> icu_;
};

enum class SplitBehavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

// One piece of text moving through the pre-tokenizers; at_start marks a piece that begins at
// offset 0 of the original input (Metaspace prepend_scheme "first" needs it).
struct Piece {
  std::string text;
  bool at_start = false;
};

// Splits `p` at `matches` (byte ranges, sorted) by `behavior`, appending non-empty pieces to out.
// invert: the non-matching stretches act as the delimiters instead.
void split_piece(const Piece& p, const std::vector<std::pair<size_t, size_t>>& matches, SplitBehavior behavior,
                 bool invert, std::vector<Piece>& out);

// ---- added / special tokens ----------------------------------------------------------------------
struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

// Leftmost-longest multi-string matcher with the tokenizers library's lstrip/rstrip/single_word
// rules. Segment: either plain text [begin, end) (id < 0) or a matched token.
class TokenSplitter {
 public:
  struct Segment {
    size_t begin, end;
    int32_t id;
  };
  void add(const std::string& pattern, const AddedToken& token);
  bool empty() const { return tokens_.empty(); }
  std::vector<Segment> split(std::string_view s) const;

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> next;  // sorted by byte
    int32_t token = -1;                             // index into tokens_
  };
  int32_t child(int32_t node, uint8_t b) const;
  std::vector<Node> nodes_{Node{}};
  std::vector<AddedToken> tokens_;
};

// ---- BPE model -------------------------------------------------------------------------------
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using Vocab = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  Vocab vocab;
  std::vector<std::string> id_to_token;  // dense over the vocab's ids ("" for gaps)
  std::optional<int32_t> unk_id;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::string continuing_subword_prefix, end_of_word_suffix;

  // merges given in rank order as (left, right) token strings; fails with a clear message.
  void set_merges(const std::vector<std::pair<std::string, std::string>>& merges, const std::string& where);
  void finalize();  // after vocab/unk/byte_fallback are set
  // Appends the ids for one pre-token (already in the model's alphabet).
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;
  size_t merge_count() const { return merges_.size(); }

 private:
  void tokenize_uncached(std::string_view word, std::vector<int32_t>& out) const;
  struct MergeInfo {
    int32_t rank, new_id;
  };
  std::unordered_map<uint64_t, MergeInfo> merges_;
  std::array<int32_t, 256> byte_ids_{};  // <0xHH> ids or -1
  bool all_bytes_ = false;

  // Result cache per pre-token word, sharded to keep threads from contending on one lock.
  static constexpr size_t kShards = 32, kShardCapacity = 16384, kMaxCachedBytes = 96;
  struct Shard {
    mutable std::shared_mutex mu;
    std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> map;
  };
  mutable std::array<Shard, kShards> cache_;
};

// ---- engines ---------------------------------------------------------------------------------
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& json_path);
std::unique_ptr<Tokenizer> load_spm_tokenizer(const std::filesystem::path& model_path);
// Thrown by load_hf_tokenizer when model.type is not BPE, so load() can fall back to a
// tokenizer.model sitting beside it.
class UnsupportedModel : public Error {
 public:
  using Error::Error;
};

}  // namespace llmtune::tok::detail
