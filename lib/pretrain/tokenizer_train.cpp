// `llmtune tokenizer train`: a Llama-style SentencePiece model (BPE or Unigram, byte fallback,
// digits split, identity normalisation, "▁" dummy prefix) trained with libsentencepiece's trainer,
// plus the equivalent HF tokenizer.json (BPE merges derived from the vocabulary the way transformers'
// converter does; Unigram with its scores) and tokenizer_config.json with specials and a chat template.
// Caveat: chat markers are control pieces, so text is split at them before encoding (HF added tokens).
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <thread>
#include <tuple>

#include <fmt/ranges.h>

#include "core/core.h"
#include "pretrain/pretrain.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::pretrain {
namespace {

// Streams lines of every input file (sentencepiece's unit of training text).
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(std::vector<fs::path> files) : files_(std::move(files)) { advance(); }
  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void advance() {
    while (true) {
      if (!in_.is_open()) {
        if (next_file_ >= files_.size()) {
          done_ = true;
          return;
        }
        in_.open(files_[next_file_++], std::ios::binary);
        if (!in_) fail("tokenizer train: cannot open {}", files_[next_file_ - 1].string());
      }
      if (std::getline(in_, line_)) {
        if (!line_.empty() && line_.back() == '\r') line_.pop_back();
        if (line_.find_first_not_of(" \t") == std::string::npos) continue;  // blank lines carry nothing
        return;
      }
      in_.close();
      in_.clear();
    }
  }
  std::vector<fs::path> files_;
  size_t next_file_ = 0;
  std::ifstream in_;
  std::string line_;
  bool done_ = false;
};

void write_json(const fs::path& p, const nlohmann::json& j) {
  std::ofstream f(p);
  f << j.dump(2, ' ', false) << '\n';
  if (!f) fail("cannot write {}", p.string());
}

nlohmann::json added_token(int id, const std::string& content) {
  return {{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
          {"normalized", false}, {"special", true}};
}

// UTF-8 character boundaries of s (byte offsets, including 0 and size).
std::vector<size_t> char_bounds(const std::string& s) {
  std::vector<size_t> b;
  for (size_t i = 0; i < s.size(); ++i)
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) b.push_back(i);
  b.push_back(s.size());
  return b;
}

}  // namespace

nlohmann::json sentencepiece_to_tokenizer_json(const fs::path& model_file, const std::string& type,
                                               const std::vector<std::string>& user_symbols) {
  sentencepiece::SentencePieceProcessor sp;
  if (auto st = sp.Load(model_file.string()); !st.ok()) fail("{}: not a SentencePiece model ({})", model_file.string(), st.ToString());
  const int n = sp.GetPieceSize();
  nlohmann::json added = nlohmann::json::array();
  std::vector<bool> normal(static_cast<size_t>(n), true);
  for (int id = 0; id < n; ++id) {
    const std::string piece = sp.IdToPiece(id);
    const bool user = std::find(user_symbols.begin(), user_symbols.end(), piece) != user_symbols.end();
    if (sp.IsControl(id) || sp.IsUnknown(id) || user) added.push_back(added_token(id, piece));
    if (sp.IsControl(id) || sp.IsUnknown(id) || sp.IsByte(id) || sp.IsUnused(id) || user) normal[static_cast<size_t>(id)] = false;
  }
  const std::string unk = sp.unk_id() >= 0 ? sp.IdToPiece(sp.unk_id()) : "<unk>";
  nlohmann::json model;
  if (type == "bpe") {
    nlohmann::ordered_json vocab;
    std::map<std::string, int> index;
    for (int id = 0; id < n; ++id) {
      vocab[sp.IdToPiece(id)] = id;
      index[sp.IdToPiece(id)] = id;
    }
    // Every split of a normal piece into two normal pieces is a merge; rank = (merged id, left id, right id),
    // i.e. by the merged piece's score, as sentencepiece's BPE picks the best-scoring pair.
    std::vector<std::tuple<int, int, int>> merges;
    for (int id = 0; id < n; ++id) {
      if (!normal[static_cast<size_t>(id)]) continue;
      const std::string p = sp.IdToPiece(id);
      const auto bounds = char_bounds(p);
      for (size_t k = 1; k + 1 < bounds.size(); ++k) {
        auto l = index.find(p.substr(0, bounds[k])), r = index.find(p.substr(bounds[k]));
        if (l == index.end() || r == index.end()) continue;
        if (!normal[static_cast<size_t>(l->second)] || !normal[static_cast<size_t>(r->second)]) continue;
        merges.emplace_back(id, l->second, r->second);
      }
    }
    std::sort(merges.begin(), merges.end());
    nlohmann::json m = nlohmann::json::array();
    for (const auto& [id, l, r] : merges) m.push_back({sp.IdToPiece(l), sp.IdToPiece(r)});
    model = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", unk}, {"continuing_subword_prefix", nullptr},
             {"end_of_word_suffix", nullptr}, {"fuse_unk", true}, {"byte_fallback", true}, {"ignore_merges", false},
             {"vocab", vocab}, {"merges", m}};
  } else if (type == "unigram") {
    nlohmann::json vocab = nlohmann::json::array();
    for (int id = 0; id < n; ++id) vocab.push_back({sp.IdToPiece(id), static_cast<double>(sp.GetScore(id))});
    model = {{"type", "Unigram"}, {"unk_id", sp.unk_id()}, {"vocab", vocab}, {"byte_fallback", true}};
  } else {
    fail("tokenizer type `{}` is not one of bpe, unigram", type);
  }
  const std::string bos = sp.bos_id() >= 0 ? sp.IdToPiece(sp.bos_id()) : "<s>";
  nlohmann::json post = nullptr;
  if (sp.bos_id() >= 0)
    post = {{"type", "TemplateProcessing"},
            {"single", {{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair",
             {{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
              {{"SpecialToken", {{"id", bos}, {"type_id", 1}}}}, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
            {"special_tokens", {{bos, {{"id", bos}, {"ids", {sp.bos_id()}}, {"tokens", {bos}}}}}}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer",
           {{"type", "Sequence"},
            {"normalizers",
             {{{"type", "Prepend"}, {"prepend", "\u2581"}},
              {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}}}}},
          {"pre_tokenizer", nullptr},
          {"post_processor", post},
          {"decoder",
           {{"type", "Sequence"},
            {"decoders",
             {{{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}}, {"content", " "}},
              {{"type", "ByteFallback"}},
              {{"type", "Fuse"}},
              {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
          {"model", model}};
}

TokenizerTrainResult train_tokenizer(const TokenizerTrainOptions& o) {
  const double t0 = now_seconds();
  if (o.inputs.empty()) fail("tokenizer train: give at least one --input text file");
  for (const auto& f : o.inputs)
    if (!fs::is_regular_file(f)) fail("tokenizer train: --input {} is not a file", f.string());
  if (o.type != "bpe" && o.type != "unigram") fail("tokenizer train: --type `{}` is not one of bpe, unigram", o.type);
  const int64_t reserved = 3 + static_cast<int64_t>(o.user_symbols.size()) + 256;  // specials + byte pieces
  if (o.vocab_size <= reserved)
    fail("tokenizer train: --vocab-size {} leaves no room for learned pieces ({} are reserved for <unk> <s> </s>, {} "
         "chat markers and 256 byte pieces)", o.vocab_size, reserved, o.user_symbols.size());
  if (o.out.empty()) fail("tokenizer train: --out DIR is required");
  if (!o.chat_template.empty() && !tok::ChatTemplate::is_builtin(o.chat_template) &&
      o.chat_template.find("{%") == std::string::npos && o.chat_template.find("{{") == std::string::npos)
    fail("tokenizer train: --chat-template `{}` is neither a built-in template ({}) nor Jinja source", o.chat_template,
         fmt::format("{}", fmt::join(tok::ChatTemplate::builtin_names(), ", ")));
  fs::create_directories(o.out);
  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::string control;
  for (const auto& s : o.user_symbols) control += (control.empty() ? "" : ",") + s;
  std::unordered_map<std::string, std::string> kw = {
      {"model_type", o.type},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"character_coverage", fmt::format("{}", o.character_coverage)},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"split_by_unicode_script", "true"},
      {"split_by_whitespace", "true"},
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "true"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"unk_id", "0"}, {"bos_id", "1"}, {"eos_id", "2"}, {"pad_id", "-1"},
      {"unk_piece", "<unk>"}, {"bos_piece", "<s>"}, {"eos_piece", "</s>"},
      {"max_sentence_length", std::to_string(o.max_sentence_length)},
      {"num_threads", std::to_string(threads)},
      {"minloglevel", "1"},
  };
  if (!control.empty()) kw["control_symbols"] = control;
  if (o.input_sentence_size > 0) {
    kw["input_sentence_size"] = std::to_string(o.input_sentence_size);
    kw["shuffle_input_sentence"] = "true";
  }
  LineIterator lines(o.inputs);
  std::string proto;
  auto st = sentencepiece::SentencePieceTrainer::Train(kw, &lines, &proto);
  if (!st.ok()) {
    std::string msg = st.ToString();
    if (msg.find("Vocabulary size") != std::string::npos)
      fail("tokenizer train: {} — the text is too small for --vocab-size {}; lower it or add text", msg, o.vocab_size);
    fail("tokenizer train: sentencepiece failed: {}", msg);
  }
  TokenizerTrainResult r;
  const fs::path model_file = o.out / "tokenizer.model";
  {
    std::ofstream f(model_file, std::ios::binary);
    f.write(proto.data(), static_cast<std::streamsize>(proto.size()));
    if (!f) fail("cannot write {}", model_file.string());
  }
  sentencepiece::SentencePieceProcessor sp;
  if (auto s2 = sp.LoadFromSerializedProto(proto); !s2.ok()) fail("tokenizer train: the trained model does not load: {}", s2.ToString());
  r.vocab_size = sp.GetPieceSize();

  write_json(o.out / "tokenizer.json", sentencepiece_to_tokenizer_json(model_file, o.type, o.user_symbols));
  nlohmann::json decoder = nlohmann::json::object();
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    const std::string piece = sp.IdToPiece(id);
    if (sp.IsControl(id) || sp.IsUnknown(id)) {
      auto t = added_token(id, piece);
      t.erase("id");
      decoder[std::to_string(id)] = t;
    }
  }
  const std::string chat = o.chat_template.empty() ? ""
                           : tok::ChatTemplate::is_builtin(o.chat_template) ? tok::ChatTemplate::builtin_source(o.chat_template)
                                                                            : o.chat_template;
  nlohmann::json cfg = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                        {"add_bos_token", true},
                        {"add_eos_token", false},
                        {"bos_token", "<s>"},
                        {"eos_token", "</s>"},
                        {"unk_token", "<unk>"},
                        {"pad_token", "<unk>"},
                        {"additional_special_tokens", o.user_symbols},
                        {"added_tokens_decoder", decoder},
                        {"clean_up_tokenization_spaces", false},
                        {"model_max_length", o.model_max_length},
                        {"padding_side", "right"}};
  if (!chat.empty()) cfg["chat_template"] = chat;
  write_json(o.out / "tokenizer_config.json", cfg);
  write_json(o.out / "special_tokens_map.json", {{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"},
                                                 {"pad_token", "<unk>"}, {"additional_special_tokens", o.user_symbols}});
  r.files = {model_file, o.out / "tokenizer.json", o.out / "tokenizer_config.json", o.out / "special_tokens_map.json"};
  r.seconds = now_seconds() - t0;
  return r;
}

}  // namespace llmtune::pretrain
