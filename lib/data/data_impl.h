// Internal to lib/data: the compiled per-dataset formatter and the thin layer over tok::Tokenizer the
// formatters use (encode with/without special tokens, byte offsets, special ids, tokenizer fingerprint).
#pragma once
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "data/data.h"
#include "tokenizer/chat_template.h"

namespace llmtune::data {

namespace detail {
// Token ids of `text`; add_special = the tokenizer's post-processor (BOS for Llama-style tokenizers).
std::vector<int32_t> encode(const tok::Tokenizer& t, std::string_view text, bool add_special);
// Token ids of `text` (special tokens in the text are recognised, none added) and, per token, the
// half-open byte range of `text` it covers.
std::vector<int32_t> encode_offsets(const tok::Tokenizer& t, std::string_view text,
                                    std::vector<std::pair<size_t, size_t>>& offsets);
std::optional<int32_t> eos_id(const tok::Tokenizer& t);
std::string eos_token(const tok::Tokenizer& t);
std::string bos_token(const tok::Tokenizer& t);
// Id of a token string that must encode to exactly one token (eot_tokens); nullopt otherwise.
std::optional<int32_t> single_token_id(const tok::Tokenizer& t, const std::string& token);
// The tokenizer's own chat template (tokenizer_config.json / chat_template.jinja), "" if none.
std::string own_chat_template(const tok::Tokenizer& t);
// Hash of everything that decides the tokenizer's output (its files), for cache keys.
std::string fingerprint(const tok::Tokenizer& t);
}  // namespace detail

// Token indices [first, last) whose byte ranges overlap the half-open byte span [start, end).
std::pair<size_t, size_t> tokens_overlapping(const std::vector<std::pair<size_t, size_t>>& offsets, size_t start,
                                             size_t end);

struct Formatter {
  DatasetSpec spec;
  const DataOptions* options = nullptr;
  const tok::Tokenizer* tokenizer = nullptr;
  std::optional<tok::ChatTemplate> chat;  // chat_template type only
  std::map<std::string, std::string> role_map;  // dataset role name -> template role
  std::vector<std::string> roles_to_train;      // template role names
  std::string train_on_eos, train_on_eot;
  std::vector<int32_t> eot_ids;
  std::optional<int32_t> eos;
  std::string bos_str, eos_str;

  std::vector<Example> format(const nlohmann::json& record, const std::string& where) const;
  std::vector<Example> alpaca(const nlohmann::json& r, const std::string& where) const;
  std::vector<Example> completion(const nlohmann::json& r, const std::string& where) const;
  std::vector<Example> input_output(const nlohmann::json& r, const std::string& where) const;
  std::vector<Example> chat_template(const nlohmann::json& r, const std::string& where) const;
};

}  // namespace llmtune::data
