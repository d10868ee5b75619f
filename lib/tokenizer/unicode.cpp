// UTF-8 coding, Unicode properties and normalization for the tokenizer engines, backed by ICU.
// Property definitions follow what the reference engines use (Oniguruma classes for regexes,
// Rust char methods for added-token rules); ASCII takes a table fast path.
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include "core/core.h"
#include "tokenizer/tokenizer_impl.h"

namespace llmtune::tok::detail {

char32_t utf8_next(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  auto cont = [&](size_t k) { return k < s.size() && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80; };
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]) & 0x3F; };
  if (b0 >= 0xC2 && b0 <= 0xDF && cont(i + 1)) {
    char32_t c = ((b0 & 0x1F) << 6) | byte(i + 1);
    i += 2;
    return c;
  }
  if (b0 >= 0xE0 && b0 <= 0xEF && cont(i + 1) && cont(i + 2)) {
    char32_t c = ((b0 & 0x0F) << 12) | (byte(i + 1) << 6) | byte(i + 2);
    if (c >= 0x800 && (c < 0xD800 || c > 0xDFFF)) {
      i += 3;
      return c;
    }
  }
  if (b0 >= 0xF0 && b0 <= 0xF4 && cont(i + 1) && cont(i + 2) && cont(i + 3)) {
    char32_t c = ((b0 & 0x07) << 18) | (byte(i + 1) << 12) | (byte(i + 2) << 6) | byte(i + 3);
    if (c >= 0x10000 && c <= 0x10FFFF) {
      i += 4;
      return c;
    }
  }
  ++i;
  return 0xFFFD;
}

void utf8_append(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Length of the valid UTF-8 sequence at s[i] (0 if invalid), and in `prefix` the length of the
// longest prefix that could still start a valid sequence (Unicode "maximal subpart").
static size_t utf8_seq(std::string_view s, size_t i, size_t& prefix) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  prefix = 1;
  if (b0 < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (size_t k = 1; k <= need; ++k) {
    if (i + k >= s.size()) return 0;
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) return 0;
    prefix = k + 1;
  }
  return need + 1;
}

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    size_t prefix;
    const size_t n = utf8_seq(s, i, prefix);
    if (n) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += prefix;
    }
  }
  return out;
}

bool utf8_valid(std::string_view s) {
  size_t i = 0, prefix;
  while (i < s.size()) {
    const size_t n = utf8_seq(s, i, prefix);
    if (!n) return false;
    i += n;
  }
  return true;
}

bool is_letter(char32_t c) {
  if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_L_MASK) != 0;
}

bool is_number(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_N_MASK) != 0;
}

bool is_regex_space(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 9 && c <= 13);
  if (c == 0x85) return true;
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_Z_MASK) != 0;
}

bool is_white_space(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 9 && c <= 13);
  return u_isUWhiteSpace(static_cast<UChar32>(c));
}

bool is_alphanumeric(char32_t c) {
  if (c < 0x80) return is_letter(c) || is_number(c);
  return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_ALPHABETIC) || is_number(c);
}

std::string unicode_normalize(std::string_view s, NormForm form) {
  bool ascii = true;
  for (char ch : s) ascii = ascii && static_cast<unsigned char>(ch) < 0x80;
  if (ascii) return std::string(s);  // every normal form leaves ASCII alone
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* n = nullptr;
  switch (form) {
    case NormForm::nfc:
      n = icu::Normalizer2::getNFCInstance(status);
      break;
    case NormForm::nfd:
      n = icu::Normalizer2::getNFDInstance(status);
      break;
    case NormForm::nfkc:
      n = icu::Normalizer2::getNFKCInstance(status);
      break;
    case NormForm::nfkd:
      n = icu::Normalizer2::getNFKDInstance(status);
      break;
  }
  if (U_FAILURE(status)) fail("tokenizer: ICU normalizer unavailable ({})", u_errorName(status));
  const auto in = icu::UnicodeString::fromUTF8(icu::StringPiece(s.data(), static_cast<int32_t>(s.size())));
  if (n->isNormalized(in, status) && U_SUCCESS(status)) return std::string(s);
  status = U_ZERO_ERROR;
  const icu::UnicodeString res = n->normalize(in, status);
  if (U_FAILURE(status)) fail("tokenizer: unicode normalization failed ({})", u_errorName(status));
  std::string out;
  res.toUTF8String(out);
  return out;
}

// GPT-2's alphabet: printable Latin-1 bytes stand for themselves; the other 68 bytes, in byte
// order, map to U+0100 upward.
static const std::array<std::string, 256>& build_byte_map(std::array<int16_t, 0x200>* reverse) {
  static std::array<std::string, 256> map;
  static std::array<int16_t, 0x200> rev;
  static std::once_flag once;
  std::call_once(once, [] {
    rev.fill(-1);
    int next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t c = keep ? static_cast<char32_t>(b) : static_cast<char32_t>(next++);
      std::string u;
      utf8_append(u, c);
      map[b] = u;
      rev[c] = static_cast<int16_t>(b);
    }
  });
  if (reverse) *reverse = rev;
  return map;
}

const std::array<std::string, 256>& byte_to_unicode() { return build_byte_map(nullptr); }

int byte_from_unicode(char32_t c) {
  static const std::array<int16_t, 0x200> rev = [] {
    std::array<int16_t, 0x200> r;
    build_byte_map(&r);
    return r;
  }();
  return c < rev.size() ? rev[c] : -1;
}

}  // namespace llmtune::tok::detail
