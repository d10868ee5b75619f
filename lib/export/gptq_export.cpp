// `llmtune quantize --format gptq|awq`: calibration, per-layer quantization and the Hugging Face
// GPTQ / AutoAWQ (GEMM) checkpoint layout. Layers are done in order, each sub-block (q/k/v, o,
// gate/up, down) on inputs that already went through every earlier quantized linear (GPTQ's
// true_sequential; AWQ the same way). The hidden states entering the current layer are cached for all
// calibration windows and replaced by the quantized layer's outputs when it is done, so each layer
// runs alone. A sub-block's inputs are captured by temporarily swapping its first linear for a
// recorder that accumulates H = Σ x xᵀ and Σ|x|, then stops that layer's forward pass.
// Caveat: the model is quantized in fp32 on the CPU; calibration windows are cut from one token
// stream of the --calib file (a BOS first when the tokenizer adds one).
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <set>

#include <fmt/ranges.h>

#include "core/core.h"
#include "export/export.h"
#include "io/io.h"
#include "quant/quant.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::exporter {

namespace {

struct StopForward {};

// Records the statistics of its input, then aborts the forward pass (nothing later is needed).
class RecorderImpl : public model::LinearBaseImpl {
 public:
  explicit RecorderImpl(int64_t in, int64_t out) : in_(in), out_(out) {
    H = torch::zeros({in, in});
    abs_sum = torch::zeros({in});
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    auto x2 = x.reshape({-1, in_}).to(torch::kFloat);
    H.addmm_(x2.t(), x2);
    abs_sum.add_(x2.abs().sum(0));
    n += x2.size(0);
    throw StopForward{};
  }
  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  torch::Tensor H, abs_sum;
  int64_t n = 0;

 private:
  int64_t in_, out_;
};

// Passes a sublayer's output through unchanged and keeps it (set as a layer's attn/mlp adapter).
class TapImpl : public model::SublayerAdapterImpl {
 public:
  torch::Tensor forward(const torch::Tensor& y) override {
    this->y = y;
    return y;
  }
  torch::Tensor y;
};

std::string read_calibration_text(const fs::path& p) {
  if (!fs::exists(p)) fail("--calib {} does not exist; give a text (.txt) or JSON lines (.jsonl, field \"text\") file", p.string());
  std::ifstream f(p);
  if (!f) fail("cannot read --calib {}", p.string());
  std::string ext = p.extension().string();
  if (ext == ".jsonl") {
    std::string line, text;
    int64_t lineno = 0;
    while (std::getline(f, line)) {
      ++lineno;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      try {
        auto j = nlohmann::json::parse(line);
        if (!j.contains("text") || !j["text"].is_string())
          fail("{}:{}: calibration JSON lines need a string field \"text\"", p.string(), lineno);
        text += j["text"].get<std::string>() + "\n\n";
      } catch (const nlohmann::json::exception& e) {
        fail("{}:{}: not valid JSON: {}", p.string(), lineno, e.what());
      }
    }
    return text;
  }
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// n windows of `seqlen` tokens spread evenly over the token stream of the file.
torch::Tensor calibration_batch(const fs::path& calib, const fs::path& model_dir, int64_t n, int64_t seqlen) {
  auto text = read_calibration_text(calib);
  if (text.empty()) fail("--calib {} is empty", calib.string());
  auto tok = tok::Tokenizer::load(model_dir);
  auto ids = tok->encode(text, false);
  const bool bos = tok->bos_id().has_value();
  const int64_t body = seqlen - (bos ? 1 : 0);
  if (static_cast<int64_t>(ids.size()) < body)
    fail("--calib {} holds {} tokens, fewer than one window of {}; use a longer file or a smaller --calib-seqlen",
         calib.string(), ids.size(), seqlen);
  auto out = torch::empty({n, seqlen}, torch::kLong);
  const int64_t span = static_cast<int64_t>(ids.size()) - body;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t start = n == 1 ? 0 : span * i / (n - 1);
    int64_t k = 0;
    if (bos) out[i][k++] = *tok->bos_id();
    for (int64_t t = 0; t < body; ++t) out[i][k++] = ids[start + t];
  }
  if (span < (n - 1) * body)
    log::warn(fmt::format("--calib {}: {} tokens for {} windows of {}; windows overlap", calib.string(), ids.size(), n, seqlen));
  return out;
}

torch::Tensor parameter(model::TransformerImpl& m, const std::string& name) {
  for (auto& item : m.named_parameters())
    if (item.key() == name) return item.value();
  fail("no parameter {} in the model (GPTQ/AWQ export expects Llama-family names)", name);
}

std::shared_ptr<model::DenseLinearImpl> dense(model::TransformerImpl& m, const std::string& name) {
  auto d = std::dynamic_pointer_cast<model::DenseLinearImpl>(m.get_linear(name));
  if (!d) fail("{} is not a plain linear layer; GPTQ/AWQ export needs a 16/32-bit checkpoint", name);
  return d;
}

struct Stage {
  std::vector<std::string> linears;  // share one input; the first is recorded
  std::string prev_norm, prev_linear;  // AWQ folds 1/s into one of these (none: no scaling)
};

void copy_if_exists(const fs::path& from, const fs::path& to, const std::string& name) {
  if (fs::exists(from / name)) fs::copy_file(from / name, to / name, fs::copy_options::overwrite_existing);
}

}  // namespace

GroupQuantExportReport export_group_quant(const GroupQuantExportOptions& o) {
  const double t0 = now_seconds();
  GroupQuantExportReport rep;
  if (o.method != "gptq" && o.method != "awq") fail("unknown method {}", o.method);
  const auto& p = o.params;
  if (o.method == "gptq" && p.bits != 4 && p.bits != 8) fail("--bits {} is not supported for gptq; use 4 or 8", p.bits);
  if (o.method == "awq" && p.bits != 4) fail("--bits {} is not supported for awq (GEMM packing is 4-bit); use 4", p.bits);
  if (p.group_size == 0 || p.group_size < -1) fail("--group-size {} is invalid; use a positive divisor of the layer widths or -1", p.group_size);
  if (!o.rtn && o.calib.empty()) fail("--format {} needs --calib FILE (calibration text); or --rtn for plain round-to-nearest", o.method);
  if (!o.rtn && !fs::exists(o.calib)) fail("--calib {} does not exist", o.calib.string());
  if (o.calib_samples <= 0 || o.calib_seqlen < 2) fail("--calib-samples and --calib-seqlen must be positive");
  if (!fs::exists(o.model_dir / "config.json")) fail("{} has no config.json; is it a Hugging Face model directory?", o.model_dir.string());
  if (quant::checkpoint_group_quant(o.model_dir) || quant::checkpoint_quantization(o.model_dir))
    fail("{} is already quantized; GPTQ/AWQ start from a 16/32-bit checkpoint", o.model_dir.string());

  auto cfg = model::ModelConfig::from_file(o.model_dir / "config.json");
  for (int64_t in : {cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim}) {
    const int64_t per = 32 / p.bits;
    if (p.group_size > 0 && in % p.group_size != 0)
      fail("--group-size {} does not divide the input width {} of this model (hidden_size {}, intermediate_size {}); "
           "pick a divisor such as {} or -1", p.group_size, in, cfg.hidden_size, cfg.intermediate_size,
           std::gcd(std::gcd(cfg.hidden_size, cfg.intermediate_size), int64_t{128}));
    if (in % per) fail("layer width {} is not a multiple of {} ({}-bit codes packed per int32)", in, per, p.bits);
  }
  if (o.method == "awq")
    for (int64_t out : {cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim})
      if (out % 8) fail("AWQ GEMM packing needs output widths divisible by 8 (got {})", out);

  torch::NoGradGuard ng;
  auto m = model::load_pretrained(o.model_dir, torch::kFloat);
  m->eval();
  torch::Tensor calib;
  if (!o.rtn) {
    const int64_t seqlen = std::min<int64_t>(o.calib_seqlen, cfg.max_position_embeddings);
    calib = calibration_batch(o.calib, o.model_dir, o.calib_samples, seqlen);
    log::info(fmt::format("{}: {} calibration windows of {} tokens from {}", o.method, calib.size(0), seqlen, o.calib.string()));
  }
  // GPTQ's sequential scheme: X holds the hidden states entering the current decoder layer for every
  // calibration window ([N, T, C], the embeddings at first). Only that layer runs: the model's layer
  // list is narrowed to it and X goes in as inputs_embeds (the model still builds the RoPE tables and
  // masks). A sub-block's inputs are recorded by stopping there; once the layer is quantized, its
  // outputs become the next layer's X. Calibration so costs about five layer forwards per layer
  // (four partial, one whole), not a forward from the embeddings up for every sub-block.
  torch::Tensor X;
  if (!o.rtn) X = m->embed(calib);
  auto run_layer = [&](int64_t l, const std::function<void(int64_t, int64_t)>& each) {
    auto all = m->decoder->layer_list;
    m->decoder->layer_list = {all[l]};
    try {
      for (int64_t b = 0; b < X.size(0); b += o.batch) each(b, std::min(o.batch, X.size(0) - b));
    } catch (...) {
      m->decoder->layer_list = all;
      throw;
    }
    m->decoder->layer_list = all;
  };
  auto forward_x = [&](int64_t b, int64_t nb) {
    model::ForwardOptions fo;
    fo.inputs_embeds = X.narrow(0, b, nb);
    m->hidden_states(torch::Tensor(), fo);
  };
  auto record = [&](int64_t l, const std::string& name) {
    auto orig = m->get_linear(name);
    auto rec = std::make_shared<RecorderImpl>(orig->in_features(), orig->out_features());
    m->replace_linear(name, rec);
    run_layer(l, [&](int64_t b, int64_t nb) {
      try {
        forward_x(b, nb);
      } catch (const StopForward&) {
      }
    });
    m->replace_linear(name, orig);
    return rec;
  };
  // The layer's output is x + a + m (attention and MLP outputs added to the residual stream); taps
  // on the two sublayer outputs give it exactly, without the final norm the model applies after.
  auto advance = [&](int64_t l) {
    auto layer = m->decoder->layer_list[l];
    auto attn = std::make_shared<TapImpl>(), mlp = std::make_shared<TapImpl>();
    layer->set_adapters(attn, mlp);
    run_layer(l, [&](int64_t b, int64_t nb) {
      forward_x(b, nb);
      auto x = X.narrow(0, b, nb);
      x.copy_((x + attn->y) + mlp->y);
    });
    layer->set_adapters(nullptr, nullptr);
  };

  const bool same_heads = cfg.num_attention_heads == cfg.num_key_value_heads;
  std::map<std::string, quant::GroupQuantized> results;
  double err_sum = 0, ref_sum = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string P = fmt::format("model.layers.{}.", l);
    const std::vector<Stage> stages = {
        {{P + "self_attn.q_proj", P + "self_attn.k_proj", P + "self_attn.v_proj"}, P + "input_layernorm.weight", ""},
        {{P + "self_attn.o_proj"}, "", same_heads ? P + "self_attn.v_proj" : ""},
        {{P + "mlp.gate_proj", P + "mlp.up_proj"}, P + "post_attention_layernorm.weight", ""},
        {{P + "mlp.down_proj"}, "", P + "mlp.up_proj"}};
    for (const auto& st : stages) {
      std::vector<std::shared_ptr<model::DenseLinearImpl>> lins;
      for (const auto& n : st.linears) lins.push_back(dense(*m, n));
      if (o.rtn) {
        for (size_t i = 0; i < lins.size(); ++i) {
          auto qp = p;
          qp.awq_quantizer = o.method == "awq";
          auto g = quant::rtn_quantize(lins[i]->weight, qp);
          lins[i]->weight.copy_(g.dequantize());
          results[st.linears[i]] = std::move(g);
        }
        continue;
      }
      auto rec = record(l, st.linears[0]);
      auto H = rec->H / static_cast<double>(rec->n);  // mean x xᵀ: scale-free, keeps magnitudes sane
      for (size_t i = 0; i < lins.size(); ++i) ref_sum += quant::weighted_error(lins[i]->weight, H);
      if (o.method == "gptq") {
        for (size_t i = 0; i < lins.size(); ++i) {
          auto g = quant::gptq_quantize(lins[i]->weight, H, p);
          auto deq = g.dequantize();
          err_sum += quant::weighted_error(lins[i]->weight - deq, H);
          lins[i]->weight.copy_(deq);
          results[st.linears[i]] = std::move(g);
        }
        continue;
      }
      // AWQ: search s, fold 1/s into the op before (norm weight, or rows of an already quantized
      // linear through its per-row scales, which is exact), s into these weights' columns.
      std::vector<torch::Tensor> ws;
      for (auto& d : lins) ws.push_back(d->weight.clone());
      auto xmean = rec->abs_sum / static_cast<double>(rec->n);
      torch::Tensor s = torch::ones({ws[0].size(1)});
      if (!st.prev_norm.empty() || !st.prev_linear.empty()) {
        double alpha = 0;
        s = quant::awq_search_scales(ws, H, xmean, p, &alpha);
        log::debug(fmt::format("awq: {} alpha {:.2f}", st.linears[0], alpha));
        if (!st.prev_norm.empty()) {
          parameter(*m, st.prev_norm).div_(s);
        } else {
          auto& g = results.at(st.prev_linear);
          g.scales.div_(s.unsqueeze(0));
          dense(*m, st.prev_linear)->weight.copy_(g.dequantize());
        }
      }
      auto Hs = H / s.unsqueeze(1) / s.unsqueeze(0);  // statistics of the scaled input x / s
      for (size_t i = 0; i < lins.size(); ++i) {
        const auto& n = st.linears[i];
        const bool clip = n.find("q_proj") == std::string::npos && n.find("k_proj") == std::string::npos;
        auto ws_i = ws[i] * s.unsqueeze(0);
        auto g = quant::awq_clip_quantize(ws_i, Hs, p, clip);
        auto deq = g.dequantize();
        err_sum += quant::weighted_error(ws_i - deq, Hs);
        lins[i]->weight.copy_(deq);
        results[n] = std::move(g);
      }
    }
    if (!o.rtn) advance(l);  // the quantized layer's outputs are the next layer's inputs
    log::info(fmt::format("{}: layer {}/{} done ({:.1f} s)", o.rtn ? "rtn" : o.method, l + 1, cfg.num_hidden_layers,
                          now_seconds() - t0));
  }
  if (ref_sum > 0) rep.relative_output_error = err_sum / ref_sum;

  // ---- write the checkpoint ----------------------------------------------------------------
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::set<std::string> skip;
  for (const auto& [name, g] : results) {
    auto packed = o.method == "awq" ? quant::awq_pack(g) : quant::gptq_pack(g);
    for (auto& [k, t] : packed) tensors.emplace_back(name + "." + k, t);
    skip.insert(name + ".weight");
  }
  for (const auto& item : m->named_parameters()) {
    if (skip.count(item.key())) continue;
    tensors.emplace_back(item.key(), item.value().detach().to(torch::kHalf).contiguous());
  }
  fs::create_directories(o.out);
  io::checkpoint_save(o.out, tensors);
  quant::GroupQuantConfig qc;
  qc.method = o.method;
  qc.bits = p.bits;
  qc.group_size = p.group_size;
  qc.sym = p.sym;
  qc.desc_act = p.act_order;
  auto out_cfg = m->config();
  out_cfg.dtype = "float16";
  auto j = out_cfg.to_json();
  auto qj = qc.to_json();
  if (o.method == "gptq") qj["damp_percent"] = p.damp_percent;
  j["quantization_config"] = qj;
  {
    std::ofstream f(o.out / "config.json");
    f << j.dump(2) << "\n";
    if (!f) fail("cannot write {}", (o.out / "config.json").string());
  }
  if (o.method == "gptq") {
    std::ofstream f(o.out / "quantize_config.json");
    f << qj.dump(2) << "\n";
  }
  for (const char* n : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                        "generation_config.json", "chat_template.jinja"})
    copy_if_exists(o.model_dir, o.out, n);
  rep.n_linears = static_cast<int64_t>(results.size());
  for (const auto& e : fs::directory_iterator(o.out))
    if (e.path().extension() == ".safetensors") rep.file_bytes += static_cast<int64_t>(fs::file_size(e.path()));
  rep.seconds = now_seconds() - t0;
  return rep;
}

}  // namespace llmtune::exporter
