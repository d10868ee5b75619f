// The data module's view of tok::Tokenizer, including token -> byte offsets. tok::Tokenizer has no offsets
// API, so offsets come from aligning each token's surface bytes to the text: byte-level BPE tokens map back
// to their exact bytes through the GPT-2 byte alphabet; SentencePiece-style pieces are "▁" -> " " and
// <0xHH> -> one byte, where a leading "▁" the normalizer prepended (absent from the text) is zero-width;
// special/added tokens are their content. The alignment must consume the text exactly or it throws, so a
// mask is never built from guessed offsets. Caveat: normalizers that rewrite text (NFC on non-NFC input,
// lowercasing) make alignment fail with that error.
#include <fstream>
#include <sstream>

#include "core/core.h"
#include "data/data_impl.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::data::detail {
namespace {

// GPT-2 bytes_to_unicode, inverted: code point -> byte (formats.md §3.2).
const std::map<uint32_t, uint8_t>& byte_level_inverse() {
  static const std::map<uint32_t, uint8_t> inv = [] {
    std::map<uint32_t, uint8_t> m;
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      bool direct = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      m[direct ? b : next++] = static_cast<uint8_t>(b);
    }
    return m;
  }();
  return inv;
}

// Decodes UTF-8 into code points; false on malformed input.
bool utf8_codepoints(std::string_view s, std::vector<uint32_t>& out) {
  out.clear();
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out.push_back(cp);
    i += n;
  }
  return true;
}

enum class Style { byte_level, sentencepiece };

Style detect_style(const tok::Tokenizer& t) {
  auto ids = t.encode(" a", false);
  for (int32_t id : ids) {
    std::string p = t.id_to_token(id);
    if (p.find("\xE2\x96\x81") != std::string::npos) return Style::sentencepiece;  // ▁
    if (p.find("\xC4\xA0") != std::string::npos) return Style::byte_level;        // Ġ
  }
  return t.engine().find("sentencepiece") != std::string::npos ? Style::sentencepiece : Style::byte_level;
}

// The bytes a token stands for in the original text. `prefix_space_optional`: the leading space may be
// one the normalizer added.
std::string surface(const tok::Tokenizer& t, int32_t id, Style style, bool& prefix_space_optional) {
  prefix_space_optional = false;
  std::string piece = t.id_to_token(id);
  if (t.is_special(id)) return piece;
  if (style == Style::byte_level) {
    std::vector<uint32_t> cps;
    const auto& inv = byte_level_inverse();
    std::string bytes;
    if (utf8_codepoints(piece, cps)) {
      bool ok = true;
      for (uint32_t cp : cps) {
        auto it = inv.find(cp);
        if (it == inv.end()) {
          ok = false;
          break;
        }
        bytes += static_cast<char>(it->second);
      }
      if (ok) return bytes;
    }
    return piece;  // an added token written literally
  }
  // SentencePiece style.
  if (piece.size() == 6 && piece.rfind("<0x", 0) == 0 && piece.back() == '>') {
    return std::string(1, static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));
  }
  std::string out;
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, 3, "\xE2\x96\x81") == 0) {
      out += ' ';
      i += 3;
    } else {
      out += piece[i++];
    }
  }
  prefix_space_optional = !out.empty() && out[0] == ' ';
  return out;
}

}  // namespace

std::vector<int32_t> encode(const tok::Tokenizer& t, std::string_view text, bool add_special) {
  return t.encode(text, add_special);
}

std::vector<int32_t> encode_offsets(const tok::Tokenizer& t, std::string_view text,
                                    std::vector<std::pair<size_t, size_t>>& offsets) {
  // Detected per call (one tiny encode): caching by Tokenizer address would go stale when one is freed.
  const Style style = detect_style(t);
  auto ids = t.encode(text, false);
  offsets.assign(ids.size(), {0, 0});
  size_t cur = 0;
  for (size_t k = 0; k < ids.size(); ++k) {
    bool optional_space = false;
    std::string s = surface(t, ids[k], style, optional_space);
    size_t start = cur;
    if (text.substr(cur, s.size()) == s) {
      cur += s.size();
    } else if (optional_space && text.substr(cur, s.size() - 1) == std::string_view(s).substr(1)) {
      cur += s.size() - 1;  // the normalizer's prepended "▁" covers no byte of the text
    } else {
      fail("cannot map token {} (`{}`) back to the text at byte {} (the tokenizer's normalizer rewrites the "
           "text); exact label masks need tokens that align with the text — please report this tokenizer",
           k, t.id_to_token(ids[k]), cur);
    }
    offsets[k] = {start, cur};
  }
  if (cur != text.size())
    fail("token offsets cover {} of {} bytes of the rendered text; the tokenizer's normalizer rewrites the text",
         cur, text.size());
  return ids;
}

std::optional<int32_t> eos_id(const tok::Tokenizer& t) { return t.eos_id(); }
std::string eos_token(const tok::Tokenizer& t) { return t.specials().eos.value_or(""); }
std::string bos_token(const tok::Tokenizer& t) { return t.specials().bos.value_or(""); }

std::optional<int32_t> single_token_id(const tok::Tokenizer& t, const std::string& token) {
  if (auto id = t.token_to_id(token)) return id;
  auto ids = t.encode(token, false);
  if (ids.size() == 1) return ids[0];
  return std::nullopt;
}

std::string own_chat_template(const tok::Tokenizer& t) { return t.chat_template(); }

std::string fingerprint(const tok::Tokenizer& t) {
  std::filesystem::path dir = t.source();
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) dir = dir.parent_path();
  std::string all = t.engine();
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                           "chat_template.jinja"}) {
    std::ifstream f(dir / name, std::ios::binary);
    if (!f) continue;
    std::ostringstream ss;
    ss << f.rdbuf();
    all += std::string("\n--") + name + "--\n" + hash_hex(ss.str());
  }
  return hash_hex(all);
}

}  // namespace llmtune::data::detail
