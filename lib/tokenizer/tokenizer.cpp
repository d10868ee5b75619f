// Tokenizer loading and what both engines share: tokenizer_config.json / special_tokens_map.json
// / chat_template.jinja, special-token bookkeeping, the PAD==EOS and double-BOS traps, threaded
// batch encoding and the streaming decoder.
#include <atomic>
#include <exception>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/core.h"
#include "tokenizer/tokenizer_impl.h"

namespace llmtune::tok {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) fail("cannot open {}", p.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({})", p.string(), e.what());
  }
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail("cannot open {}", p.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A special token value: "text", {"content": "text", ...} (AddedToken), or null.
// Returns nullopt for "absent", and an empty optional-in-optional for an explicit null.
std::optional<std::optional<std::string>> token_value(const json& cfg, const char* key, const fs::path& file) {
  if (!cfg.contains(key)) return std::nullopt;
  const auto& v = cfg.at(key);
  if (v.is_null()) return std::optional<std::string>{};
  if (v.is_string()) return std::optional<std::string>{v.get<std::string>()};
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return std::optional<std::string>{v["content"].get<std::string>()};
  fail("{}: \"{}\" must be a string or an AddedToken object with \"content\"", file.string(), key);
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load(const fs::path& where) {
  fs::path dir = where, file;
  if (fs::is_regular_file(where)) {
    dir = where.parent_path();
    file = where;
  } else if (!fs::is_directory(where)) {
    fail("tokenizer path {} does not exist (expected a model directory with tokenizer.json or tokenizer.model)",
         where.string());
  }
  const fs::path json_path = dir / "tokenizer.json", model_path = dir / "tokenizer.model";
  if (file.empty()) {
    if (fs::exists(json_path))
      file = json_path;
    else if (fs::exists(model_path))
      file = model_path;
    else
      fail(
          "no tokenizer in {}: expected tokenizer.json or tokenizer.model (set tokenizer_config in the recipe to "
          "point elsewhere)",
          dir.string());
  }
  std::unique_ptr<Tokenizer> tok;
  if (file.extension() == ".json") {
    try {
      tok = detail::load_hf_tokenizer(file);
    } catch (const detail::UnsupportedModel& e) {
      if (!fs::exists(model_path)) throw;
      log::debug(fmt::format("{}; using {} instead", e.what(), model_path.string()));
      file = model_path;
    }
  }
  if (!tok) tok = detail::load_spm_tokenizer(file);
  tok->source_ = file;
  tok->load_config(dir);
  return tok;
}

void Tokenizer::load_config(const fs::path& dir) {
  const fs::path cfg_path = dir / "tokenizer_config.json", map_path = dir / "special_tokens_map.json";
  const json cfg = fs::exists(cfg_path) ? read_json(cfg_path) : json::object();
  const json map = fs::exists(map_path) ? read_json(map_path) : json::object();
  if (!cfg.is_object()) fail("{}: expected a JSON object", cfg_path.string());
  if (!map.is_object()) fail("{}: expected a JSON object", map_path.string());

  SpecialTokens defaults;
  engine_defaults(defaults);
  auto resolve = [&](const char* key, std::optional<std::string> SpecialTokens::*field,
                     std::optional<int32_t> SpecialTokens::*id_field) {
    auto v = token_value(cfg, key, cfg_path);
    if (!v) v = token_value(map, key, map_path);
    specials_.*field = v ? *v : defaults.*field;
    const auto& s = specials_.*field;
    if (!s) return;
    specials_.*id_field = token_to_id(*s);
    if (!(specials_.*id_field))
      config_warnings_.push_back(
          fmt::format("{} \"{}\" is not in the vocabulary of {}; it is ignored", key, *s, source_.filename().string()));
  };
  resolve("bos_token", &SpecialTokens::bos, &SpecialTokens::bos_id);
  resolve("eos_token", &SpecialTokens::eos, &SpecialTokens::eos_id);
  resolve("pad_token", &SpecialTokens::pad, &SpecialTokens::pad_id);
  resolve("unk_token", &SpecialTokens::unk, &SpecialTokens::unk_id);

  for (const json* src : {&cfg, &map}) {
    if (!src->contains("additional_special_tokens") || !specials_.additional.empty()) continue;
    for (const auto& v : (*src)["additional_special_tokens"]) {
      if (v.is_string())
        specials_.additional.push_back(v.get<std::string>());
      else if (v.is_object() && v.contains("content"))
        specials_.additional.push_back(v["content"].get<std::string>());
    }
  }

  if (cfg.contains("added_tokens_decoder")) {
    for (const auto& [key, v] : cfg["added_tokens_decoder"].items()) {
      int32_t id;
      try {
        id = std::stoi(key);
      } catch (const std::exception&) {
        fail("{}: added_tokens_decoder key \"{}\" is not a token id", cfg_path.string(), key);
      }
      if (!v.is_object() || !v.contains("content"))
        fail("{}: added_tokens_decoder[\"{}\"] needs \"content\"", cfg_path.string(), key);
      const bool special = v.value("special", false);
      if (special) config_special_ids_.push_back(id);
      config_added_token(id, v["content"].get<std::string>(), special);
    }
  }

  auto opt_bool = [&](const char* key) -> std::optional<bool> {
    if (!cfg.contains(key) || cfg[key].is_null()) return std::nullopt;
    if (!cfg[key].is_boolean()) fail("{}: \"{}\" must be true or false", cfg_path.string(), key);
    return cfg[key].get<bool>();
  };
  set_bos_eos(opt_bool("add_bos_token"), opt_bool("add_eos_token"));

  // Chat template: chat_template.jinja wins over the config's chat_template.
  if (cfg.contains("chat_template")) {
    const auto& ct = cfg["chat_template"];
    if (ct.is_string()) {
      chat_templates_["default"] = ct.get<std::string>();
    } else if (ct.is_array()) {
      for (const auto& e : ct) {
        if (!e.is_object() || !e.contains("name") || !e.contains("template"))
          fail("{}: chat_template list entries must be {{\"name\": ..., \"template\": ...}}", cfg_path.string());
        chat_templates_[e["name"].get<std::string>()] = e["template"].get<std::string>();
      }
    } else if (!ct.is_null()) {
      fail("{}: chat_template must be a string or a list of {{name, template}}", cfg_path.string());
    }
  }
  const fs::path jinja = dir / "chat_template.jinja";
  if (fs::exists(jinja)) chat_templates_["default"] = read_text(jinja);
  if (auto it = chat_templates_.find("default"); it != chat_templates_.end()) chat_template_ = it->second;

  if (cfg.contains("model_max_length") && cfg["model_max_length"].is_number()) {
    const double v = cfg["model_max_length"].get<double>();
    if (v > 0 && v < 1e18) model_max_length_ = static_cast<int64_t>(v);  // transformers uses 1e30 for "no limit"
  }
}

bool Tokenizer::is_special(int32_t id) const {
  if (engine_is_special(id)) return true;
  for (int32_t s : config_special_ids_)
    if (s == id) return true;
  for (const auto* o : {&specials_.bos_id, &specials_.eos_id, &specials_.pad_id, &specials_.unk_id})
    if (*o && **o == id) return true;
  return false;
}

std::optional<std::string> Tokenizer::special_token(std::string_view name) const {
  if (name == "bos_token") return specials_.bos;
  if (name == "eos_token") return specials_.eos;
  if (name == "pad_token") return specials_.pad;
  if (name == "unk_token") return specials_.unk;
  return std::nullopt;
}

std::vector<std::string> Tokenizer::warnings() const {
  std::vector<std::string> w = config_warnings_;
  if (specials_.pad_id && specials_.eos_id && *specials_.pad_id == *specials_.eos_id)
    w.push_back(fmt::format(
        "the pad token is the EOS token \"{}\" (id {}): padding is masked out of the loss, so EOS would be too and "
        "the model would never learn to stop: set a distinct pad token (pad_token in the recipe, e.g. an unused "
        "reserved token or \"<unk>\")",
        *specials_.eos, *specials_.eos_id));
  return w;
}

CheckedEncoding Tokenizer::encode_with_bos_check(std::string_view text, bool add_special_tokens,
                                                 bool drop_duplicate_bos) const {
  CheckedEncoding r;
  r.ids = encode(text, add_special_tokens);
  const auto& bos = specials_.bos;
  const auto& bos_id = specials_.bos_id;
  if (add_special_tokens && add_bos_ && bos && bos_id && !bos->empty() && text.substr(0, bos->size()) == *bos &&
      r.ids.size() >= 2 && r.ids[0] == *bos_id && r.ids[1] == *bos_id) {
    r.warnings.push_back(fmt::format(
        "the text already starts with the BOS token \"{}\" and the tokenizer adds another (add_bos_token), so the "
        "sequence would begin with two BOS tokens{}: remove BOS from the template/data or set add_bos_token: false",
        *bos, drop_duplicate_bos ? " (the duplicate was dropped)" : ""));
    if (drop_duplicate_bos) r.ids.erase(r.ids.begin());
  }
  return r;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts,
                                                          bool add_special_tokens, int threads) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  int n = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  constexpr size_t kChunk = 64;
  n = static_cast<int>(std::min<size_t>(n, (texts.size() + kChunk - 1) / kChunk));
  if (n <= 1) {
    for (size_t i = 0; i < texts.size(); ++i) out[i] = encode(texts[i], add_special_tokens);
    return out;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  auto work = [&] {
    try {
      while (true) {
        const size_t a = next.fetch_add(kChunk);
        if (a >= texts.size()) break;
        const size_t b = std::min(texts.size(), a + kChunk);
        for (size_t i = a; i < b; ++i) out[i] = encode(texts[i], add_special_tokens);
      }
    } catch (...) {
      std::lock_guard lock(error_mu);
      if (!error) error = std::current_exception();
      next = texts.size();
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
  return out;
}

// ---- streaming ---------------------------------------------------------------------------------
StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tok_(tokenizer), skip_(skip_special_tokens) {}

namespace {
bool ends_incomplete(const std::string& s) { return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0; }
}  // namespace

// Decodes the window [prefix_, end) twice (with and without the tokens not yet emitted) and
// returns the difference, so decoders that look at context (leading-space stripping, byte
// fallback runs) see the same neighbours as in a full decode.
std::string StreamDecoder::put(int32_t id) {
  ids_.push_back(id);
  const std::vector<int32_t> seen(ids_.begin() + static_cast<std::ptrdiff_t>(prefix_),
                                  ids_.begin() + static_cast<std::ptrdiff_t>(read_));
  const std::vector<int32_t> all(ids_.begin() + static_cast<std::ptrdiff_t>(prefix_), ids_.end());
  const std::string before = tok_.decode(seen, skip_), now = tok_.decode(all, skip_);
  if (now.size() <= before.size() || ends_incomplete(now) || now.compare(0, before.size(), before) != 0) return "";
  prefix_ = read_;
  read_ = ids_.size();
  return now.substr(before.size());
}

std::string StreamDecoder::finish() {
  const std::vector<int32_t> seen(ids_.begin() + static_cast<std::ptrdiff_t>(prefix_),
                                  ids_.begin() + static_cast<std::ptrdiff_t>(read_));
  const std::vector<int32_t> all(ids_.begin() + static_cast<std::ptrdiff_t>(prefix_), ids_.end());
  const std::string before = tok_.decode(seen, skip_), now = tok_.decode(all, skip_);
  prefix_ = read_ = ids_.size();
  if (now.size() <= before.size() || now.compare(0, before.size(), before) != 0) return "";
  return now.substr(before.size());
}

}  // namespace llmtune::tok
