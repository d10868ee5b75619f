// The tokenizer.json engine: the Hugging Face tokenizers pipeline (added tokens -> normalizer ->
// pre-tokenizer -> BPE model -> post-processor; decoders for the way back) for the component
// types Llama-family files use. Anything else is rejected at load time with the JSON path named.
#include <unicode/locid.h>
#include <unicode/unistr.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "core/core.h"
#include "tokenizer/tokenizer_impl.h"

namespace llmtune::tok::detail {

namespace {

using json = nlohmann::json;

// ---- components --------------------------------------------------------------------------------
struct Normalizer {
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& s) const = 0;
};
struct PreTokenizer {
  virtual ~PreTokenizer() = default;
  virtual void apply(std::vector<Piece>& pieces) const = 0;
};
struct Decoder {
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  if (from.empty()) return std::string(s);
  size_t i = 0;
  while (true) {
    const size_t k = s.find(from, i);
    if (k == std::string_view::npos) break;
    out.append(s.substr(i, k - i));
    out.append(to);
    i = k + from.size();
  }
  out.append(s.substr(i));
  return out;
}

// "pattern": {"String": "..."} or {"Regex": "..."}
struct Pattern {
  std::string literal;
  std::unique_ptr<RegexSplitter> regex;
  void find(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
    if (regex) return regex->find(s, out);
    out.clear();
    if (literal.empty()) return;
    for (size_t i = s.find(literal); i != std::string_view::npos; i = s.find(literal, i + literal.size()))
      out.emplace_back(i, i + literal.size());
  }
  std::string replace(std::string_view s, std::string_view content) const {
    if (!regex) return replace_all(s, literal, content);
    std::vector<std::pair<size_t, size_t>> m;
    regex->find(s, m);
    std::string out;
    size_t prev = 0;
    for (auto [a, b] : m) out.append(s.substr(prev, a - prev)).append(content), prev = b;
    return out.append(s.substr(prev));
  }
};

struct Ctx {
  std::string file;
  [[noreturn]] void unsupported(const std::string& where, const std::string& type, const char* supported) const {
    fail(
        "{}: {} type \"{}\" is not supported by llmtune (supported: {}); use a tokenizer.model "
        "(SentencePiece) for this model or convert the tokenizer",
        file, where, type, supported);
  }
  const json& need(const json& j, const char* key, const std::string& where) const {
    if (!j.contains(key)) fail("{}: {} is missing the key \"{}\"", file, where, key);
    return j.at(key);
  }
  Pattern pattern(const json& j, const std::string& where) const {
    Pattern p;
    if (j.is_string())
      p.literal = j.get<std::string>();
    else if (j.contains("String"))
      p.literal = j["String"].get<std::string>();
    else if (j.contains("Regex"))
      p.regex = std::make_unique<RegexSplitter>(j["Regex"].get<std::string>());
    else
      fail("{}: {}.pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}", file, where);
    return p;
  }
};

// -- normalizers
struct SeqNormalizer : Normalizer {
  std::vector<std::unique_ptr<Normalizer>> parts;
  void normalize(std::string& s) const override {
    for (const auto& p : parts) p->normalize(s);
  }
};
struct PrependNormalizer : Normalizer {
  std::string prefix;
  void normalize(std::string& s) const override {
    if (!s.empty()) s = prefix + s;
  }
};
struct ReplaceNormalizer : Normalizer {
  Pattern pattern;
  std::string content;
  void normalize(std::string& s) const override { s = pattern.replace(s, content); }
};
struct NfNormalizer : Normalizer {
  NormForm form;
  explicit NfNormalizer(NormForm f) : form(f) {}
  void normalize(std::string& s) const override { s = unicode_normalize(s, form); }
};
struct StripNormalizer : Normalizer {
  bool left = true, right = true;
  void normalize(std::string& s) const override {
    size_t a = 0, b = s.size();
    if (left)
      while (a < b) {
        size_t k = a;
        if (!is_white_space(utf8_next(s, k))) break;
        a = k;
      }
    if (right)
      while (b > a) {
        size_t p = b - 1;
        while (p > a && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
        size_t k = p;
        if (!is_white_space(utf8_next(s, k))) break;
        b = p;
      }
    s = s.substr(a, b - a);
  }
};
struct LowercaseNormalizer : Normalizer {
  void normalize(std::string& s) const override {
    auto u = icu::UnicodeString::fromUTF8(s);
    u.toLower(icu::Locale::getRoot());
    s.clear();
    u.toUTF8String(s);
  }
};

std::unique_ptr<Normalizer> make_normalizer(const Ctx& c, const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const auto type = c.need(j, "type", where).get<std::string>();
  if (type == "Sequence") {
    auto n = std::make_unique<SeqNormalizer>();
    size_t k = 0;
    for (const auto& e : c.need(j, "normalizers", where))
      if (auto p = make_normalizer(c, e, fmt::format("{}.normalizers[{}]", where, k++)))
        n->parts.push_back(std::move(p));
    return n;
  }
  if (type == "Prepend") {
    auto n = std::make_unique<PrependNormalizer>();
    n->prefix = c.need(j, "prepend", where).get<std::string>();
    return n;
  }
  if (type == "Replace") {
    auto n = std::make_unique<ReplaceNormalizer>();
    n->pattern = c.pattern(c.need(j, "pattern", where), where);
    n->content = c.need(j, "content", where).get<std::string>();
    return n;
  }
  if (type == "NFC") return std::make_unique<NfNormalizer>(NormForm::nfc);
  if (type == "NFD") return std::make_unique<NfNormalizer>(NormForm::nfd);
  if (type == "NFKC") return std::make_unique<NfNormalizer>(NormForm::nfkc);
  if (type == "NFKD") return std::make_unique<NfNormalizer>(NormForm::nfkd);
  if (type == "Strip") {
    auto n = std::make_unique<StripNormalizer>();
    n->left = j.value("strip_left", true);
    n->right = j.value("strip_right", true);
    return n;
  }
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
  c.unsupported(where, type, "Sequence, Prepend, Replace, NFC, NFD, NFKC, NFKD, Strip, Lowercase");
}

// -- pre-tokenizers
struct SeqPre : PreTokenizer {
  std::vector<std::unique_ptr<PreTokenizer>> parts;
  void apply(std::vector<Piece>& pieces) const override {
    for (const auto& p : parts) p->apply(pieces);
  }
};

// Applies `f(piece, out)` to each piece, replacing the list.
template <typename F>
void for_each_piece(std::vector<Piece>& pieces, F&& f) {
  thread_local std::vector<Piece> out;
  out.clear();
  for (const auto& p : pieces) f(p, out);
  pieces.swap(out);
}

struct SplitPre : PreTokenizer {
  Pattern pattern;
  SplitBehavior behavior = SplitBehavior::isolated;
  bool invert = false;
  void apply(std::vector<Piece>& pieces) const override {
    for_each_piece(pieces, [&](const Piece& p, std::vector<Piece>& out) {
      thread_local std::vector<std::pair<size_t, size_t>> m;
      pattern.find(p.text, m);
      split_piece(p, m, behavior, invert, out);
    });
  }
};

struct DigitsPre : PreTokenizer {
  bool individual = false;
  void apply(std::vector<Piece>& pieces) const override {
    for_each_piece(pieces, [&](const Piece& p, std::vector<Piece>& out) {
      thread_local std::vector<std::pair<size_t, size_t>> m;
      m.clear();
      size_t i = 0;
      while (i < p.text.size()) {
        const size_t a = i;
        if (is_number(utf8_next(p.text, i))) m.emplace_back(a, i);
      }
      split_piece(p, m, individual ? SplitBehavior::isolated : SplitBehavior::contiguous, false, out);
    });
  }
};

struct ByteLevelPre : PreTokenizer {
  bool add_prefix_space = false;
  std::unique_ptr<RegexSplitter> regex;  // null when use_regex is false
  void apply(std::vector<Piece>& pieces) const override {
    const auto& map = byte_to_unicode();
    for_each_piece(pieces, [&](const Piece& p0, std::vector<Piece>& out) {
      Piece p = p0;
      if (add_prefix_space && (p.text.empty() || p.text[0] != ' ')) p.text = " " + p.text;
      const size_t first = out.size();
      if (regex) {
        thread_local std::vector<std::pair<size_t, size_t>> m;
        regex->find(p.text, m);
        split_piece(p, m, SplitBehavior::isolated, false, out);
      } else if (!p.text.empty()) {
        out.push_back(std::move(p));
      }
      for (size_t k = first; k < out.size(); ++k) {
        std::string mapped;
        mapped.reserve(out[k].text.size() * 2);
        for (unsigned char b : out[k].text) mapped += map[b];
        out[k].text = std::move(mapped);
      }
    });
  }
};

enum class Prepend { always, first, never };

struct MetaspacePre : PreTokenizer {
  std::string replacement = "\xE2\x96\x81";
  Prepend scheme = Prepend::always;
  bool split = true;
  void apply(std::vector<Piece>& pieces) const override {
    for_each_piece(pieces, [&](const Piece& p0, std::vector<Piece>& out) {
      Piece p{replace_all(p0.text, " ", replacement), p0.at_start};
      const bool starts = p.text.compare(0, replacement.size(), replacement) == 0;
      if (!starts && (scheme == Prepend::always || (scheme == Prepend::first && p.at_start)))
        p.text = replacement + p.text;
      if (!split) {
        if (!p.text.empty()) out.push_back(std::move(p));
        return;
      }
      thread_local std::vector<std::pair<size_t, size_t>> m;
      m.clear();
      for (size_t i = p.text.find(replacement); i != std::string::npos;
           i = p.text.find(replacement, i + replacement.size()))
        m.emplace_back(i, i + replacement.size());
      split_piece(p, m, SplitBehavior::merged_with_next, false, out);
    });
  }
};

Prepend parse_prepend(const Ctx& c, const json& j, const std::string& where) {
  if (j.contains("prepend_scheme")) {
    const auto s = j["prepend_scheme"].get<std::string>();
    if (s == "always") return Prepend::always;
    if (s == "first") return Prepend::first;
    if (s == "never") return Prepend::never;
    fail("{}: {}.prepend_scheme \"{}\" must be always, first or never", c.file, where, s);
  }
  return j.value("add_prefix_space", true) ? Prepend::always : Prepend::never;
}

SplitBehavior parse_behavior(const Ctx& c, const std::string& s, const std::string& where) {
  static const std::pair<const char*, SplitBehavior> names[] = {
      {"Removed", SplitBehavior::removed},
      {"Isolated", SplitBehavior::isolated},
      {"MergedWithPrevious", SplitBehavior::merged_with_previous},
      {"MergedWithNext", SplitBehavior::merged_with_next},
      {"Contiguous", SplitBehavior::contiguous}};
  for (const auto& [n, b] : names)
    if (s == n) return b;
  fail("{}: {}.behavior \"{}\" is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous", c.file,
       where, s);
}

std::unique_ptr<PreTokenizer> make_pre(const Ctx& c, const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const auto type = c.need(j, "type", where).get<std::string>();
  if (type == "Sequence") {
    auto p = std::make_unique<SeqPre>();
    size_t k = 0;
    for (const auto& e : c.need(j, "pretokenizers", where))
      if (auto q = make_pre(c, e, fmt::format("{}.pretokenizers[{}]", where, k++))) p->parts.push_back(std::move(q));
    return p;
  }
  if (type == "Split") {
    auto p = std::make_unique<SplitPre>();
    p->pattern = c.pattern(c.need(j, "pattern", where), where);
    p->behavior = parse_behavior(c, c.need(j, "behavior", where).get<std::string>(), where);
    p->invert = j.value("invert", false);
    return p;
  }
  if (type == "ByteLevel") {
    auto p = std::make_unique<ByteLevelPre>();
    p->add_prefix_space = j.value("add_prefix_space", true);
    if (j.value("use_regex", true)) p->regex = std::make_unique<RegexSplitter>(RegexSplitter::gpt2_pattern());
    return p;
  }
  if (type == "Metaspace") {
    auto p = std::make_unique<MetaspacePre>();
    if (j.contains("replacement")) p->replacement = j["replacement"].get<std::string>();
    p->scheme = parse_prepend(c, j, where);
    p->split = j.value("split", true);
    return p;
  }
  if (type == "Digits") {
    auto p = std::make_unique<DigitsPre>();
    p->individual = j.value("individual_digits", false);
    return p;
  }
  c.unsupported(where, type, "Sequence, Split, ByteLevel, Metaspace, Digits");
}

// -- decoders
struct SeqDecoder : Decoder {
  std::vector<std::unique_ptr<Decoder>> parts;
  void decode_chain(std::vector<std::string>& t) const override {
    for (const auto& p : parts) p->decode_chain(t);
  }
};
struct ByteLevelDecoder : Decoder {
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const auto& t : tokens) {
      // A token with a char outside the byte alphabet (e.g. an added token) goes in as raw UTF-8.
      const size_t mark = bytes.size();
      bool ok = true;
      size_t i = 0;
      while (i < t.size()) {
        const int b = byte_from_unicode(utf8_next(t, i));
        if (b < 0) {
          ok = false;
          break;
        }
        bytes += static_cast<char>(b);
      }
      if (!ok) bytes.resize(mark), bytes += t;
    }
    tokens.assign(1, utf8_lossy(bytes));
  }
};
struct ReplaceDecoder : Decoder {
  Pattern pattern;
  std::string content;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) t = pattern.replace(t, content);
  }
};
struct ByteFallbackDecoder : Decoder {
  static int byte_token(const std::string& t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    auto hex = [](char ch) {
      return std::isxdigit(static_cast<unsigned char>(ch)) ? std::stoi(std::string(1, ch), nullptr, 16) : -1;
    };
    const int hi = hex(t[3]), lo = hex(t[4]);
    return (hi < 0 || lo < 0) ? -1 : hi * 16 + lo;
  }
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    size_t pending_n = 0;
    auto flush = [&] {
      if (!pending_n) return;
      if (utf8_valid(pending))
        out.push_back(pending);
      else
        for (size_t k = 0; k < pending_n; ++k) out.emplace_back("\xEF\xBF\xBD");
      pending.clear();
      pending_n = 0;
    };
    for (auto& t : tokens) {
      const int b = byte_token(t);
      if (b >= 0) {
        pending += static_cast<char>(b);
        ++pending_n;
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens.swap(out);
  }
};
struct FuseDecoder : Decoder {
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};
struct StripDecoder : Decoder {
  char32_t content = ' ';
  size_t start = 0, stop = 0;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      std::vector<std::pair<size_t, char32_t>> cs;
      size_t i = 0;
      while (i < t.size()) {
        const size_t a = i;
        cs.emplace_back(a, utf8_next(t, i));
      }
      size_t a = 0, b = cs.size();
      while (a < std::min(start, cs.size()) && cs[a].second == content) ++a;
      for (size_t k = 0; k < stop && b > a && cs[b - 1].second == content; ++k) --b;
      const size_t ba = a < cs.size() ? cs[a].first : t.size(), bb = b < cs.size() ? cs[b].first : t.size();
      t = t.substr(ba, bb - ba);
    }
  }
};
struct MetaspaceDecoder : Decoder {
  std::string replacement = "\xE2\x96\x81";
  Prepend scheme = Prepend::always;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t k = 0; k < tokens.size(); ++k)
      tokens[k] = replace_all(tokens[k], replacement, (k == 0 && scheme != Prepend::never) ? "" : " ");
  }
};

std::unique_ptr<Decoder> make_decoder(const Ctx& c, const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const auto type = c.need(j, "type", where).get<std::string>();
  if (type == "Sequence") {
    auto d = std::make_unique<SeqDecoder>();
    size_t k = 0;
    for (const auto& e : c.need(j, "decoders", where))
      if (auto q = make_decoder(c, e, fmt::format("{}.decoders[{}]", where, k++))) d->parts.push_back(std::move(q));
    return d;
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Replace") {
    auto d = std::make_unique<ReplaceDecoder>();
    d->pattern = c.pattern(c.need(j, "pattern", where), where);
    d->content = c.need(j, "content", where).get<std::string>();
    return d;
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    auto d = std::make_unique<StripDecoder>();
    const auto content = c.need(j, "content", where).get<std::string>();
    size_t i = 0;
    d->content = content.empty() ? U' ' : utf8_next(content, i);
    d->start = j.value("start", 0);
    d->stop = j.value("stop", 0);
    return d;
  }
  if (type == "Metaspace") {
    auto d = std::make_unique<MetaspaceDecoder>();
    if (j.contains("replacement")) d->replacement = j["replacement"].get<std::string>();
    d->scheme = parse_prepend(c, j, where);
    return d;
  }
  c.unsupported(where, type, "Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace");
}

// ---- the tokenizer -----------------------------------------------------------------------------
class HfTokenizer final : public Tokenizer {
 public:
  explicit HfTokenizer(const std::filesystem::path& path);

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override;
  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    if (auto it = added_by_content_.find(token); it != added_by_content_.end()) return it->second;
    if (auto it = model_.vocab.find(token); it != model_.vocab.end()) return it->second;
    return std::nullopt;
  }
  std::string id_to_token(int32_t id) const override {
    if (auto it = added_.find(id); it != added_.end()) return it->second.content;
    if (id >= 0 && static_cast<size_t>(id) < model_.id_to_token.size()) return model_.id_to_token[id];
    return "";
  }
  std::string engine() const override { return "tokenizer.json (BPE)"; }

 protected:
  bool engine_is_special(int32_t id) const override {
    auto it = added_.find(id);
    return it != added_.end() && it->second.special;
  }
  void set_bos_eos(std::optional<bool> add_bos, std::optional<bool> add_eos) override;

 private:
  void encode_text(std::string_view text, bool at_start, std::vector<int32_t>& ids) const;
  void run_model(Piece piece, std::vector<int32_t>& ids) const;
  void parse_post(const Ctx& c, const json& j, const std::string& where);

  BpeModel model_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_;
  std::unique_ptr<Decoder> decoder_;
  std::unordered_map<int32_t, AddedToken> added_;
  Vocab added_by_content_;
  TokenSplitter raw_split_, norm_split_;
  std::vector<int32_t> prefix_, suffix_;  // what the post-processor adds around a single sequence
  int32_t vocab_size_ = 0;
};

HfTokenizer::HfTokenizer(const std::filesystem::path& path) {
  Ctx c{path.string()};
  json j;
  {
    std::ifstream in(path);
    if (!in) fail("cannot open {}", path.string());
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      fail("{}: not valid JSON ({})", path.string(), e.what());
    }
  }
  try {
    const auto& m = c.need(j, "model", "the top level");
    const std::string type = m.value("type", m.contains("merges") ? "BPE" : "");
    if (type != "BPE")
      throw UnsupportedModel(
          fmt::format("{}: model type \"{}\" is not supported by llmtune's tokenizer.json "
                      "engine (only BPE); put the model's tokenizer.model beside it",
                      c.file, type));
    for (const auto& [tok, id] : c.need(m, "vocab", "model").items()) model_.vocab.emplace(tok, id.get<int32_t>());
    int32_t max_id = -1;
    for (const auto& [tok, id] : model_.vocab) max_id = std::max(max_id, id);
    model_.id_to_token.assign(static_cast<size_t>(max_id + 1), "");
    for (const auto& [tok, id] : model_.vocab) model_.id_to_token[id] = tok;
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      auto it = model_.vocab.find(m["unk_token"].get<std::string>());
      if (it != model_.vocab.end()) model_.unk_id = it->second;
    }
    auto str_or_empty = [&](const char* k) { return m.contains(k) && m[k].is_string() ? m[k].get<std::string>() : ""; };
    model_.continuing_subword_prefix = str_or_empty("continuing_subword_prefix");
    model_.end_of_word_suffix = str_or_empty("end_of_word_suffix");
    model_.fuse_unk = m.value("fuse_unk", false);
    model_.byte_fallback = m.value("byte_fallback", false);
    model_.ignore_merges = m.value("ignore_merges", false);
    if (m.contains("dropout") && m["dropout"].is_number() && m["dropout"].get<double>() > 0)
      log::warn(fmt::format("{}: model.dropout is ignored (BPE dropout is for training the tokenizer)", c.file));
    std::vector<std::pair<std::string, std::string>> merges;
    size_t k = 0;
    for (const auto& e : c.need(m, "merges", "model")) {
      if (e.is_string()) {
        const auto s = e.get<std::string>();
        if (s.rfind("#version", 0) == 0) continue;
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          fail("{}: model.merges[{}] = \"{}\" must be two tokens separated by one space", c.file, k, s);
        merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      } else if (e.is_array() && e.size() == 2) {
        merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
      } else {
        fail("{}: model.merges[{}] must be \"a b\" or [\"a\", \"b\"]", c.file, k);
      }
      ++k;
    }
    model_.set_merges(merges, c.file);
    model_.finalize();
    vocab_size_ = max_id + 1;

    normalizer_ = make_normalizer(c, j.value("normalizer", json()), "normalizer");
    pre_ = make_pre(c, j.value("pre_tokenizer", json()), "pre_tokenizer");
    decoder_ = make_decoder(c, j.value("decoder", json()), "decoder");

    size_t n = 0;
    for (const auto& a : j.value("added_tokens", json::array())) {
      const auto where = fmt::format("added_tokens[{}]", n++);
      AddedToken t;
      t.id = c.need(a, "id", where).get<int32_t>();
      t.content = c.need(a, "content", where).get<std::string>();
      t.single_word = a.value("single_word", false);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.normalized = a.value("normalized", !a.value("special", false));
      t.special = a.value("special", false);
      added_[t.id] = t;
      added_by_content_.emplace(t.content, t.id);
      vocab_size_ = std::max(vocab_size_, t.id + 1);
    }
    // Insertion in id order keeps "first definition wins" deterministic.
    std::vector<int32_t> order;
    for (const auto& [id, t] : added_) order.push_back(id);
    std::sort(order.begin(), order.end());
    for (int32_t id : order) {
      const auto& t = added_[id];
      if (!t.normalized) {
        raw_split_.add(t.content, t);
      } else {
        std::string pat = t.content;  // normalized tokens match the normalized text
        if (normalizer_) normalizer_->normalize(pat);
        norm_split_.add(pat, t);
      }
    }
    parse_post(c, j.value("post_processor", json()), "post_processor");
  } catch (const json::exception& e) {
    fail("{}: unexpected structure ({})", c.file, e.what());
  }
}

void HfTokenizer::parse_post(const Ctx& c, const json& j, const std::string& where) {
  if (j.is_null()) return;
  const auto type = c.need(j, "type", where).get<std::string>();
  if (type == "Sequence") {
    size_t k = 0;
    for (const auto& e : c.need(j, "processors", where)) parse_post(c, e, fmt::format("{}.processors[{}]", where, k++));
  } else if (type == "ByteLevel") {
    // offsets only
  } else if (type == "TemplateProcessing") {
    const auto& specials = j.value("special_tokens", json::object());
    bool seen_a = false;
    for (const auto& item : c.need(j, "single", where)) {
      if (item.contains("Sequence")) {
        seen_a = true;
      } else if (item.contains("SpecialToken")) {
        const auto name = item["SpecialToken"]["id"].get<std::string>();
        if (!specials.contains(name))
          fail("{}: {}.single names special token \"{}\" missing from special_tokens", c.file, where, name);
        for (const auto& id : specials[name]["ids"]) (seen_a ? suffix_ : prefix_).push_back(id.get<int32_t>());
      }
    }
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    prefix_.push_back(c.need(j, "cls", where)[1].get<int32_t>());
    suffix_.push_back(c.need(j, "sep", where)[1].get<int32_t>());
  } else {
    c.unsupported(where, type, "Sequence, ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing");
  }
}

void HfTokenizer::set_bos_eos(std::optional<bool> add_bos, std::optional<bool> add_eos) {
  const auto& bos = specials_.bos_id;
  const auto& eos = specials_.eos_id;
  add_bos_ = bos && !prefix_.empty() && prefix_.front() == *bos;
  add_eos_ = eos && !suffix_.empty() && suffix_.back() == *eos;
  if (!add_bos && !add_eos) return;
  // tokenizer_config.json says so explicitly: rebuild the template as LlamaTokenizerFast does.
  if (add_bos) add_bos_ = *add_bos && bos.has_value();
  if (add_eos) add_eos_ = *add_eos && eos.has_value();
  prefix_.clear();
  suffix_.clear();
  if (add_bos_) prefix_.push_back(*bos);
  if (add_eos_) suffix_.push_back(*eos);
}

void HfTokenizer::run_model(Piece piece, std::vector<int32_t>& ids) const {
  thread_local std::vector<Piece> pieces;
  if (!pre_) {
    model_.tokenize(piece.text, ids);
    return;
  }
  pieces.clear();
  pieces.push_back(std::move(piece));
  pre_->apply(pieces);
  for (const auto& p : pieces) model_.tokenize(p.text, ids);
}

void HfTokenizer::encode_text(std::string_view text, bool at_start, std::vector<int32_t>& ids) const {
  std::string s(text);
  if (normalizer_) normalizer_->normalize(s);
  if (s.empty()) return;
  if (norm_split_.empty()) return run_model(Piece{std::move(s), at_start}, ids);
  for (const auto& seg : norm_split_.split(s)) {
    if (seg.id >= 0)
      ids.push_back(seg.id);
    else
      run_model(Piece{s.substr(seg.begin, seg.end - seg.begin), at_start && seg.begin == 0}, ids);
  }
}

std::vector<int32_t> HfTokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = prefix_;
  if (raw_split_.empty()) {
    encode_text(text, true, ids);
  } else {
    for (const auto& seg : raw_split_.split(text)) {
      if (seg.id >= 0)
        ids.push_back(seg.id);
      else
        encode_text(text.substr(seg.begin, seg.end - seg.begin), seg.begin == 0, ids);
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
  return ids;
}

std::string HfTokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (auto it = added_.find(id); it != added_.end()) {
      if (!(skip_special_tokens && it->second.special)) tokens.push_back(it->second.content);
    } else if (id >= 0 && static_cast<size_t>(id) < model_.id_to_token.size()) {
      tokens.push_back(model_.id_to_token[id]);
    }
  }
  if (!decoder_) {
    std::string out;
    for (size_t k = 0; k < tokens.size(); ++k) out += (k ? " " : "") + tokens[k];
    return out;
  }
  decoder_->decode_chain(tokens);
  std::string out;
  for (const auto& t : tokens) out += t;
  return out;
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& json_path) {
  return std::make_unique<HfTokenizer>(json_path);
}

}  // namespace llmtune::tok::detail
