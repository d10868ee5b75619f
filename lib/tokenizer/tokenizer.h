// llmtune::tok — text <-> token ids for the Llama family: Hugging Face tokenizer.json (byte-level
// BPE and SentencePiece-style BPE) and SentencePiece tokenizer.model, plus tokenizer_config.json.
// Caveats: only BPE models in tokenizer.json (Unigram/WordPiece -> clear error, or tokenizer.model
// is used when present); decode does not apply transformers' clean_up_tokenization_spaces.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace llmtune::tok {

// The named special tokens from tokenizer_config.json / special_tokens_map.json (or the
// tokenizer.model's control pieces); an id is absent when the token is unset or not in the vocab.
struct SpecialTokens {
  std::optional<std::string> bos, eos, pad, unk;
  std::optional<int32_t> bos_id, eos_id, pad_id, unk_id;
  std::vector<std::string> additional;  // additional_special_tokens
};

// Ids plus any trap found while encoding (see encode_with_bos_check).
struct CheckedEncoding {
  std::vector<int32_t> ids;
  std::vector<std::string> warnings;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Loads DIR: tokenizer.json if present (else tokenizer.model), plus tokenizer_config.json,
  // special_tokens_map.json and chat_template.jinja when present. A path to a tokenizer.json or
  // tokenizer.model file also works (its directory supplies the config files).
  static std::unique_ptr<Tokenizer> load(const std::filesystem::path& dir);

  // add_special_tokens: apply the post-processor (BOS/EOS as the files say). Special-token
  // strings inside `text` (e.g. "<|im_start|>", "<s>") always map to their ids.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const = 0;
  // Stable under growth only at UTF-8 boundaries; for streaming use StreamDecoder.
  virtual std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const = 0;

  // Encodes many texts on `threads` threads (0 = all cores). Output order = input order.
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts, bool add_special_tokens = true,
                                                 int threads = 0) const;

  virtual int32_t vocab_size() const = 0;  // including added tokens (max id + 1)
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::string id_to_token(int32_t id) const = 0;  // "" when out of range
  virtual std::string engine() const = 0;                 // "tokenizer.json (BPE)" or "sentencepiece (tokenizer.model)"

  const SpecialTokens& specials() const { return specials_; }
  std::optional<int32_t> bos_id() const { return specials_.bos_id; }
  std::optional<int32_t> eos_id() const { return specials_.eos_id; }
  std::optional<int32_t> pad_id() const { return specials_.pad_id; }
  std::optional<int32_t> unk_id() const { return specials_.unk_id; }
  // Whether encode(text, true) puts BOS first / EOS last.
  bool add_bos() const { return add_bos_; }
  bool add_eos() const { return add_eos_; }
  // Special tokens: added tokens marked special, control pieces, and the named tokens.
  bool is_special(int32_t id) const;
  // A special token string by config name: "bos_token", "eos_token", "pad_token", "unk_token".
  std::optional<std::string> special_token(std::string_view name) const;

  // The default chat template ("" if none): chat_template.jinja, else tokenizer_config's
  // chat_template (string, or the entry named "default" of a list of {name, template}).
  const std::string& chat_template() const { return chat_template_; }
  // All named templates (the default one under "default").
  const std::map<std::string, std::string>& chat_templates() const { return chat_templates_; }
  std::optional<int64_t> model_max_length() const { return model_max_length_; }
  const std::filesystem::path& source() const { return source_; }

  // Configuration traps worth telling the user about (empty when fine), e.g. PAD == EOS.
  std::vector<std::string> warnings() const;
  // encode() plus a warning when the text already starts with the BOS string and BOS is added
  // again (two BOS tokens). With drop_duplicate_bos the extra BOS is removed.
  CheckedEncoding encode_with_bos_check(std::string_view text, bool add_special_tokens = true,
                                        bool drop_duplicate_bos = false) const;

 protected:
  // Called by the engines after construction: reads the config files in `dir`.
  void load_config(const std::filesystem::path& dir);
  // Engine hook: whether the engine itself marks an id special (added token / control piece).
  virtual bool engine_is_special(int32_t id) const = 0;
  // Engine hook: honour explicit add_bos_token/add_eos_token from tokenizer_config.json
  // (nullopt = not set there) and set add_bos_/add_eos_.
  virtual void set_bos_eos(std::optional<bool> add_bos, std::optional<bool> add_eos) = 0;
  // Engine hook: special token names to use when no config file names them.
  virtual void engine_defaults(SpecialTokens&) const {}
  // Engine hook: an entry of tokenizer_config.json's added_tokens_decoder.
  virtual void config_added_token(int32_t id, const std::string& content, bool special) {}

  SpecialTokens specials_;
  bool add_bos_ = false, add_eos_ = false;
  std::string chat_template_;
  std::map<std::string, std::string> chat_templates_;
  std::optional<int64_t> model_max_length_;
  std::filesystem::path source_;
  std::vector<int32_t> config_special_ids_;   // added_tokens_decoder entries with special: true
  std::vector<std::string> config_warnings_;  // problems found while reading the config
};

// Incremental detokenizer for generation: feed ids one at a time, get the newly finished text.
// Concatenating every piece returned (plus finish()) equals tokenizer.decode(all ids). Holds back
// text while the tail is an incomplete UTF-8 sequence (U+FFFD at the end).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);
  std::string put(int32_t id);
  std::string finish();  // flushes what was held back (possibly ending in U+FFFD)
 private:
  const Tokenizer& tok_;
  bool skip_;
  std::vector<int32_t> ids_;
  size_t prefix_ = 0, read_ = 0;  // window [prefix_, ids) decoded; [prefix_, read_) already emitted
};

}  // namespace llmtune::tok

// Chat templates are part of this module's public surface.
#include "tokenizer/chat_template.h"

namespace llmtune::tok {
// Chooses a chat template the way Axolotl's `chat_template` key does: "" or "tokenizer_default"
// (the tokenizer's own template; error if it has none), "tokenizer_default_fallback_<name>"
// (the tokenizer's own, else built-in <name>), "jinja" (uses `jinja_source`), or a built-in name.
ChatTemplate select_chat_template(const Tokenizer& tokenizer, const std::string& requested,
                                  const std::string& jinja_source = "");
// bos_token / eos_token strings (and the other special tokens) for rendering.
RenderOptions chat_render_options(const Tokenizer& tokenizer, bool add_generation_prompt);
}  // namespace llmtune::tok
