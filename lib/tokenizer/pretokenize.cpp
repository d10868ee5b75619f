// Pre-tokenization: regex splitting and added-token splitting.
// The GPT-2, Llama-3 and Qwen2 split regexes get hand-written matchers (exact backtracking
// semantics of the alternations, no regex engine in the hot path); any other pattern runs on
// ICU's regex engine after rewriting \s/\S to Oniguruma's definition (ICU's \s lacks \v, U+0085).
#include <unicode/regex.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include <algorithm>

#include "core/core.h"
#include "tokenizer/tokenizer_impl.h"

namespace llmtune::tok::detail {

namespace {

const std::string kGpt2 = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const std::string kLlama3 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const std::string kQwen2 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Code points of one piece with their byte offsets (offs has n+1 entries).
struct Cps {
  std::vector<char32_t> c;
  std::vector<uint32_t> offs;
  void load(std::string_view s) {
    c.clear();
    offs.clear();
    size_t i = 0;
    while (i < s.size()) {
      offs.push_back(static_cast<uint32_t>(i));
      c.push_back(utf8_next(s, i));
    }
    offs.push_back(static_cast<uint32_t>(s.size()));
  }
};

// Character classes, cached per code point in a small ASCII table for speed.
enum : uint8_t { kL = 1, kN = 2, kS = 4 };
inline uint8_t cls(char32_t c) {
  static const std::array<uint8_t, 128> ascii = [] {
    std::array<uint8_t, 128> t{};
    for (char32_t k = 0; k < 128; ++k)
      t[k] = (is_letter(k) ? kL : 0) | (is_number(k) ? kN : 0) | (is_regex_space(k) ? kS : 0);
    return t;
  }();
  if (c < 128) return ascii[c];
  return (is_letter(c) ? kL : 0) | (is_number(c) ? kN : 0) | (is_regex_space(c) ? kS : 0);
}

// Case-insensitive contraction match after an apostrophe at i: returns the end index or 0.
// (?i:) in Oniguruma also folds U+017F (long s) to 's'.
size_t contraction(const std::vector<char32_t>& c, size_t i, bool fold) {
  const size_t n = c.size();
  if (c[i] != '\'' || i + 1 >= n) return 0;
  auto low = [&](char32_t x) -> char32_t {
    if (!fold) return x;
    if (x == 0x17F) return 's';
    return (x >= 'A' && x <= 'Z') ? x + 32 : x;
  };
  const char32_t a = low(c[i + 1]);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
  if (i + 2 < n) {
    const char32_t b = low(c[i + 2]);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
  }
  return 0;
}

// \s+(?!\S) then \s+ on a whitespace run starting at i (the two last alternatives of all three
// patterns). Returns the end index.
size_t trailing_space(const std::vector<char32_t>& c, size_t i, size_t q) {
  if (q == c.size()) return q;   // run reaches the end: lookahead holds
  if (q - i >= 2) return q - 1;  // leave one space to lead the next word
  return q;                      // plain \s+
}

size_t match_llama3(const std::vector<char32_t>& c, size_t i, int max_digits) {
  const size_t n = c.size();
  if (size_t e = contraction(c, i, true)) return e;
  const uint8_t k = cls(c[i]);
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (k & kL) {
    size_t j = i + 1;
    while (j < n && (cls(c[j]) & kL)) ++j;
    return j;
  }
  if (c[i] != '\r' && c[i] != '\n' && !(k & kN) && i + 1 < n && (cls(c[i + 1]) & kL)) {
    size_t j = i + 2;
    while (j < n && (cls(c[j]) & kL)) ++j;
    return j;
  }
  // \p{N}{1,max}
  if (k & kN) {
    size_t j = i + 1;
    while (j < n && static_cast<int>(j - i) < max_digits && (cls(c[j]) & kN)) ++j;
    return j;
  }
  // ' '?[^\s\p{L}\p{N}]+[\r\n]*
  auto punct = [&](size_t j) { return (cls(c[j]) & (kL | kN | kS)) == 0; };
  size_t s = i;
  if (c[i] == ' ' && i + 1 < n && punct(i + 1)) s = i + 1;
  if (punct(s)) {
    size_t j = s + 1;
    while (j < n && punct(j)) ++j;
    while (j < n && (c[j] == '\r' || c[j] == '\n')) ++j;
    return j;
  }
  if (k & kS) {
    size_t q = i;
    while (q < n && (cls(c[q]) & kS)) ++q;
    // \s*[\r\n]+ : backtracking ends the match after the run's last newline
    for (size_t j = q; j > i; --j)
      if (c[j - 1] == '\r' || c[j - 1] == '\n') return j;
    return trailing_space(c, i, q);
  }
  return i;  // no alternative matches here
}

size_t match_gpt2(const std::vector<char32_t>& c, size_t i) {
  const size_t n = c.size();
  if (size_t e = contraction(c, i, false)) return e;
  // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+' in that order
  const bool sp = c[i] == ' ' && i + 1 < n;
  auto run = [&](auto pred) -> size_t {
    size_t s = (sp && pred(c[i + 1])) ? i + 1 : i;
    if (!pred(c[s])) return 0;
    size_t j = s + 1;
    while (j < n && pred(c[j])) ++j;
    return j;
  };
  if (size_t e = run([](char32_t x) { return (cls(x) & kL) != 0; })) return e;
  if (size_t e = run([](char32_t x) { return (cls(x) & kN) != 0; })) return e;
  if (size_t e = run([](char32_t x) { return (cls(x) & (kL | kN | kS)) == 0; })) return e;
  if (cls(c[i]) & kS) {
    size_t q = i;
    while (q < n && (cls(c[q]) & kS)) ++q;
    return trailing_space(c, i, q);
  }
  return i;
}

// ICU sees \s as [\t\n\f\r\p{Z}]; Oniguruma adds \v and U+0085. Rewrite so both agree.
std::string onig_to_icu(const std::string& p) {
  std::string out;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == '\\' && i + 1 < p.size()) {
      if (p[i + 1] == 's') {
        out += R"([\s\x{0B}\x{85}])";
      } else if (p[i + 1] == 'S') {
        out += R"([^\s\x{0B}\x{85}])";
      } else {
        out += p.substr(i, 2);
      }
      ++i;
    } else {
      out += p[i];
    }
  }
  return out;
}

}  // namespace

struct RegexSplitter::Icu {
  std::unique_ptr<icu::RegexPattern> pattern;
};

const std::string& RegexSplitter::gpt2_pattern() { return kGpt2; }

RegexSplitter::RegexSplitter(const std::string& pattern, bool force_icu) {
  if (!force_icu && pattern == kGpt2) {
    kind_ = Kind::gpt2;
  } else if (!force_icu && pattern == kLlama3) {
    kind_ = Kind::llama3;
  } else if (!force_icu && pattern == kQwen2) {
    kind_ = Kind::llama3;
    max_digits_ = 1;
  } else {
    kind_ = Kind::icu;
    icu_ = std::make_unique<Icu>();
    UParseError perr;
    UErrorCode status = U_ZERO_ERROR;
    const std::string rewritten = onig_to_icu(pattern);
    icu_->pattern.reset(icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(rewritten), 0, perr, status));
    if (U_FAILURE(status))
      fail(
          "tokenizer.json: the pre-tokenizer regex {:?} is not supported (ICU: {} at offset {}); "
          "this tokenizer needs a regex construct llmtune does not handle",
          pattern, u_errorName(status), perr.offset);
  }
}

RegexSplitter::~RegexSplitter() = default;

void RegexSplitter::find(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
  out.clear();
  if (s.empty()) return;
  if (kind_ != Kind::icu) {
    thread_local Cps cps;
    cps.load(s);
    const auto& c = cps.c;
    size_t i = 0;
    while (i < c.size()) {
      const size_t e = kind_ == Kind::gpt2 ? match_gpt2(c, i) : match_llama3(c, i, max_digits_);
      if (e > i) {
        out.emplace_back(cps.offs[i], cps.offs[e]);
        i = e;
      } else {
        ++i;
      }
    }
    return;
  }
  // ICU works in UTF-16: keep a map from UTF-16 index to byte offset.
  icu::UnicodeString u;
  std::vector<uint32_t> byte_at;
  size_t i = 0;
  while (i < s.size()) {
    const size_t at = i;
    const char32_t c = utf8_next(s, i);
    u.append(static_cast<UChar32>(c));
    byte_at.push_back(static_cast<uint32_t>(at));
    if (c >= 0x10000) byte_at.push_back(static_cast<uint32_t>(at));
  }
  byte_at.push_back(static_cast<uint32_t>(s.size()));
  UErrorCode status = U_ZERO_ERROR;
  std::unique_ptr<icu::RegexMatcher> m(icu_->pattern->matcher(u, status));
  while (U_SUCCESS(status) && m->find(status)) {
    const int32_t a = m->start(status), b = m->end(status);
    if (U_FAILURE(status)) break;
    if (b > a) out.emplace_back(byte_at[a], byte_at[b]);
  }
  if (U_FAILURE(status)) fail("tokenizer: regex matching failed ({})", u_errorName(status));
}

void split_piece(const Piece& p, const std::vector<std::pair<size_t, size_t>>& matches, SplitBehavior behavior,
                 bool invert, std::vector<Piece>& out) {
  // The whole string as alternating (range, is_match) stretches, as the tokenizers library does.
  struct Part {
    size_t a, b;
    bool match;
  };
  thread_local std::vector<Part> parts;
  parts.clear();
  size_t prev = 0;
  for (auto [a, b] : matches) {
    if (a > prev) parts.push_back({prev, a, invert});
    parts.push_back({a, b, !invert});
    prev = b;
  }
  if (prev < p.text.size()) parts.push_back({prev, p.text.size(), invert});

  thread_local std::vector<Part> merged;
  merged.clear();
  switch (behavior) {
    case SplitBehavior::isolated:
    case SplitBehavior::removed:
      merged = parts;
      break;
    case SplitBehavior::contiguous: {
      bool prev_match = false;
      for (const auto& q : parts) {
        if (!merged.empty() && q.match == prev_match)
          merged.back().b = q.b;
        else
          merged.push_back({q.a, q.b, false});
        prev_match = q.match;
      }
      break;
    }
    case SplitBehavior::merged_with_previous: {
      bool prev_match = false;
      for (const auto& q : parts) {
        if (q.match && !prev_match && !merged.empty())
          merged.back().b = q.b;
        else
          merged.push_back({q.a, q.b, false});
        prev_match = q.match;
      }
      break;
    }
    case SplitBehavior::merged_with_next: {
      bool prev_match = false;
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->match && !prev_match && !merged.empty())
          merged.back().a = it->a;
        else
          merged.push_back({it->a, it->b, false});
        prev_match = it->match;
      }
      std::reverse(merged.begin(), merged.end());
      break;
    }
  }
  for (const auto& q : merged) {
    if (behavior == SplitBehavior::removed && q.match) continue;
    if (q.b <= q.a) continue;
    out.push_back(Piece{p.text.substr(q.a, q.b - q.a), p.at_start && q.a == 0});
  }
}

// ---- added tokens --------------------------------------------------------------------------

int32_t TokenSplitter::child(int32_t node, uint8_t b) const {
  const auto& nx = nodes_[node].next;
  auto it = std::lower_bound(nx.begin(), nx.end(), b, [](const auto& e, uint8_t v) { return e.first < v; });
  return (it != nx.end() && it->first == b) ? it->second : -1;
}

void TokenSplitter::add(const std::string& pattern, const AddedToken& token) {
  if (pattern.empty()) return;
  int32_t node = 0;
  for (unsigned char b : pattern) {
    int32_t c = child(node, b);
    if (c < 0) {
      c = static_cast<int32_t>(nodes_.size());
      nodes_.push_back(Node{});
      auto& nx = nodes_[node].next;
      auto it = std::lower_bound(nx.begin(), nx.end(), b, [](const auto& e, uint8_t v) { return e.first < v; });
      nx.insert(it, {b, c});
    }
    node = c;
  }
  if (nodes_[node].token < 0) {  // first definition of a pattern wins
    nodes_[node].token = static_cast<int32_t>(tokens_.size());
    tokens_.push_back(token);
  }
}

namespace {
// Rust regex \w: Alphabetic, marks, decimal digits, connector punctuation, join controls.
bool is_word_char(char32_t c) {
  if (c < 0x80) return is_letter(c) || is_number(c) || c == '_';
  const auto m = U_GET_GC_MASK(static_cast<UChar32>(c));
  return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_ALPHABETIC) ||
         (m & (U_GC_M_MASK | U_GC_ND_MASK | U_GC_PC_MASK)) || c == 0x200C || c == 0x200D;
}
char32_t last_char(std::string_view s) {
  size_t i = s.size();
  while (i > 0 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) --i;
  if (i > 0) --i;
  size_t k = i;
  return utf8_next(s, k);
}
}  // namespace

std::vector<TokenSplitter::Segment> TokenSplitter::split(std::string_view s) const {
  std::vector<Segment> out;
  if (tokens_.empty() || s.empty()) {
    if (!s.empty()) out.push_back({0, s.size(), -1});
    return out;
  }
  size_t start_offset = 0, i = 0;
  while (i < s.size()) {
    // longest pattern starting at i
    int32_t node = 0, best = -1;
    size_t best_end = 0;
    for (size_t j = i; j < s.size(); ++j) {
      node = child(node, static_cast<uint8_t>(s[j]));
      if (node < 0) break;
      if (nodes_[node].token >= 0) {
        best = nodes_[node].token;
        best_end = j + 1;
      }
    }
    if (best < 0) {
      ++i;
      continue;
    }
    const AddedToken& t = tokens_[best];
    size_t a = i, b = best_end;
    i = best_end;
    if (t.single_word) {
      const bool left_ok = a == 0 || !is_word_char(last_char(s.substr(0, a)));
      size_t k = b;
      const bool right_ok = b == s.size() || !is_word_char(utf8_next(s, k));
      if (!left_ok || !right_ok) continue;
    }
    if (t.lstrip) {
      size_t na = a;
      while (na > 0) {
        size_t p = na - 1;
        while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
        size_t k = p;
        if (!is_white_space(utf8_next(s, k))) break;
        na = p;
      }
      a = std::max(na, start_offset);
    }
    if (t.rstrip) {
      size_t k = b;
      while (k < s.size()) {
        size_t k2 = k;
        if (!is_white_space(utf8_next(s, k2))) break;
        k = k2;
      }
      b = k;
      i = std::max(i, b);
    }
    if (start_offset < a) out.push_back({start_offset, a, -1});
    out.push_back({a, b, t.id});
    start_offset = b;
  }
  if (start_offset < s.size()) out.push_back({start_offset, s.size(), -1});
  return out;
}

}  // namespace llmtune::tok::detail
