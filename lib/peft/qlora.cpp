// QLoRA glue between peft and quant: LoRA wrappers over quantized (4-bit/8-bit) bases, turning
// those bases back into dense linears (for merging: dequantized to the compute dtype, exactly the
// weights the adapter was trained against), and recording/checking which base an adapter belongs to.
#include <fmt/format.h>

#include "core/core.h"
#include "peft/peft.h"
#include "quant/quant.h"

namespace llmtune::peft {

bool has_quantized_base(const model::TransformerImpl& model) { return !quant::quantized_linears(model).empty(); }

torch::Device linear_device(const model::LinearPtr& m) {
  if (auto q = std::dynamic_pointer_cast<quant::Linear4bitImpl>(m)) return q->state.packed.device();
  if (auto q = std::dynamic_pointer_cast<quant::Linear8bitImpl>(m)) return q->qweight.device();
  for (const auto& p : m->parameters()) return p.device();
  for (const auto& c : m->modules(false))
    if (auto q = std::dynamic_pointer_cast<quant::Linear4bitImpl>(c)) return q->state.packed.device();
  return torch::kCPU;
}

int64_t dequantize_bases(model::TransformerImpl& model, std::optional<torch::ScalarType> dtype) {
  int64_t n = 0;
  for (const auto& name : model.linear_names()) {
    auto lin = model.get_linear(name);
    if (auto d = quant::dequantize_linear(lin, dtype)) {  // a bare quantized linear
      model.replace_linear(name, d);
      ++n;
      continue;
    }
    // LoRA wrappers (possibly stacked): replace the innermost quantized base_layer.
    for (auto l = std::dynamic_pointer_cast<LoraLinearImpl>(lin); l;) {
      if (auto d = quant::dequantize_linear(l->base_layer, dtype)) {
        l->base_layer = d;
        l->replace_module("base_layer", d);
        ++n;
        break;
      }
      l = std::dynamic_pointer_cast<LoraLinearImpl>(l->base_layer);
    }
  }
  return n;
}

void write_qlora_record(model::TransformerImpl& model, const std::string& base_model, const fs::path& dir) {
  auto names = quant::quantized_linears(model);
  if (names.empty()) return;
  quant::BaseRecord r;
  r.base_model = base_model;
  r.fingerprint = quant::quantized_fingerprint(model);
  r.n_quantized = static_cast<int64_t>(names.size());
  // The options are read back from the first quantized layer (they are uniform by construction).
  for (const auto& item : model.named_modules("", false)) {
    if (auto q = std::dynamic_pointer_cast<quant::Linear4bitImpl>(item.value())) {
      r.options.bits = quant::QuantOptions::Bits::four;
      r.options.type = q->state.type;
      r.options.double_quant = q->state.nested;
      r.options.blocksize = q->state.blocksize;
      r.options.compute_dtype = q->compute_dtype;
      break;
    }
    if (auto q = std::dynamic_pointer_cast<quant::Linear8bitImpl>(item.value())) {
      r.options.bits = quant::QuantOptions::Bits::eight;
      r.options.compute_dtype = q->compute_dtype;
      break;
    }
    if (auto q = std::dynamic_pointer_cast<quant::LinearGroupQuantImpl>(item.value())) {  // a GPTQ/AWQ checkpoint
      r.group_quant = q->config;
      if (r.group_quant->method.empty()) {  // built by hand, not loaded: what the codes themselves say
        r.group_quant->method = q->method;
        r.group_quant->bits = q->g.bits;
        r.group_quant->group_size = q->g.group_size;
      }
      break;
    }
  }
  quant::write_base_record(dir, r);
}

}  // namespace llmtune::peft
