// The SentencePiece engine (tokenizer.model through libsentencepiece). Special-token strings
// (control and unk pieces, plus added tokens from tokenizer_config.json) are split out of the
// text first and every remaining chunk is encoded on its own, as transformers' slow
// LlamaTokenizer (legacy=True) does; BOS/EOS come from add_bos_token/add_eos_token.
#include <sentencepiece_processor.h>

#include "core/core.h"
#include "tokenizer/tokenizer_impl.h"

namespace llmtune::tok::detail {

namespace {

class SpmTokenizer final : public Tokenizer {
 public:
  explicit SpmTokenizer(const std::filesystem::path& path) : path_(path.string()) {
    const auto status = sp_.Load(path_);
    if (!status.ok())
      fail("{}: not a SentencePiece model ({}); expected the tokenizer.model shipped with the model", path_,
           status.ToString());
    const int n = sp_.GetPieceSize();
    special_.assign(static_cast<size_t>(n), false);
    for (int id = 0; id < n; ++id) {
      if (sp_.IsControl(id) || sp_.IsUnknown(id)) {
        special_[id] = true;
        AddedToken t;
        t.id = id;
        t.content = sp_.IdToPiece(id);
        t.special = true;
        splitter_.add(t.content, t);
      }
    }
    add_bos_ = sp_.bos_id() >= 0;  // LlamaTokenizer defaults: BOS yes, EOS no
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<int32_t> ids;
    if (add_special_tokens && add_bos_ && specials_.bos_id) ids.push_back(*specials_.bos_id);
    std::vector<int> piece_ids;
    for (const auto& seg : splitter_.split(text)) {
      if (seg.id >= 0) {
        ids.push_back(seg.id);
        continue;
      }
      const auto status = sp_.Encode(text.substr(seg.begin, seg.end - seg.begin), &piece_ids);
      if (!status.ok()) fail("{}: SentencePiece encode failed: {}", path_, status.ToString());
      ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
    }
    if (add_special_tokens && add_eos_ && specials_.eos_id) ids.push_back(*specials_.eos_id);
    return ids;
  }

  // Runs of ordinary ids are detokenized by SentencePiece; control/added pieces print as their
  // text (or vanish with skip_special_tokens, in which case the rest is detokenized as one run).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::string out, part;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      const auto status = sp_.Decode(run, &part);
      if (!status.ok()) fail("{}: SentencePiece decode failed: {}", path_, status.ToString());
      out += part;
      run.clear();
    };
    const int n = sp_.GetPieceSize();
    for (int32_t id : ids) {
      if (id < 0 || id >= n) continue;
      if (special_[id]) {
        if (skip_special_tokens) continue;
        if (!sp_.IsUnknown(id)) {
          flush();
          out += sp_.IdToPiece(id);
          continue;
        }
      }
      run.push_back(id);
    }
    flush();
    return out;
  }

  int32_t vocab_size() const override { return sp_.GetPieceSize(); }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    const int id = sp_.PieceToId(token);
    // PieceToId answers unk_id for unknown strings; only accept it if it really is that piece.
    if (id == sp_.unk_id() && sp_.IdToPiece(id) != token) return std::nullopt;
    return id;
  }
  std::string id_to_token(int32_t id) const override {
    return (id >= 0 && id < sp_.GetPieceSize()) ? sp_.IdToPiece(id) : std::string();
  }
  std::string engine() const override { return "sentencepiece (tokenizer.model)"; }

 protected:
  // Without a tokenizer_config.json the model's own bos/eos/unk/pad pieces name the specials.
  void engine_defaults(SpecialTokens& s) const override {
    auto name = [&](int id) -> std::optional<std::string> {
      if (id < 0 || id >= sp_.GetPieceSize()) return std::nullopt;
      return sp_.IdToPiece(id);
    };
    s.bos = name(sp_.bos_id());
    s.eos = name(sp_.eos_id());
    s.unk = name(sp_.unk_id());
    s.pad = name(sp_.pad_id());
  }
  // tokenizer_config.json's added_tokens_decoder: more strings to split out of the text.
  void config_added_token(int32_t id, const std::string& content, bool special) override {
    if (id < 0 || id >= sp_.GetPieceSize()) {
      log::warn(fmt::format("{}: added token \"{}\" has id {} outside the SentencePiece vocabulary ({}); ignored",
                            path_, content, id, sp_.GetPieceSize()));
      return;
    }
    if (special) special_[id] = true;
    AddedToken t;
    t.id = id;
    t.content = content;
    t.special = special;
    splitter_.add(content, t);
  }

  bool engine_is_special(int32_t id) const override {
    return id >= 0 && static_cast<size_t>(id) < special_.size() && special_[id];
  }
  void set_bos_eos(std::optional<bool> add_bos, std::optional<bool> add_eos) override {
    if (add_bos) add_bos_ = *add_bos;
    if (add_eos) add_eos_ = *add_eos;
    if (add_bos_ && !specials_.bos_id) add_bos_ = false;
    if (add_eos_ && !specials_.eos_id) add_eos_ = false;
  }

 private:
  std::string path_;
  sentencepiece::SentencePieceProcessor sp_;
  TokenSplitter splitter_;
  std::vector<bool> special_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_spm_tokenizer(const std::filesystem::path& model_path) {
  return std::make_unique<SpmTokenizer>(model_path);
}

}  // namespace llmtune::tok::detail
