// llmtune::quant — bitsandbytes-compatible 4-bit (NF4/FP4, block 64, optional double quantization)
// and 8-bit (per-row absmax int8) frozen base weights: quantize/dequantize byte-identical to
// bitsandbytes' reference path (formats.md §6), CPU kernels (scalar reference + AVX2/AVX-512 chosen
// at run time, CUDA when built with lib/cuda), the 4-bit/8-bit linear layers QLoRA trains through,
// loading HF checkpoints (bf16/fp16/fp32 quantized at load time, or already saved 4-bit by bnb),
// and the block-wise 8-bit "dynamic" quantizer 8-bit AdamW keeps its states in.
// Caveat: bitsandbytes' *native CPU library* quantizes the double-quant scales through a 65536-bin
// lookup table (an approximation); llmtune follows the exact nearest-code rule of its reference
// (default/CUDA) path, which the tests compare against byte for byte.
#pragma once
#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "model/model.h"

namespace llmtune::quant {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Code books

enum class QuantType { nf4, fp4 };
std::string to_string(QuantType t);
QuantType quant_type_from_string(const std::string& s, const std::string& where);  // Error names `where`
const std::array<float, 16>& code_table(QuantType t);  // index -> value (formats.md §6.1)
// bitsandbytes create_dynamic_map(signed=True): 256 sorted fp32 values (double quant, 8-bit Adam).
const std::array<float, 256>& dynamic_map_signed();
// create_dynamic_map(signed=False) (8-bit Adam's second moment, which is never negative).
const std::array<float, 256>& dynamic_map_unsigned();

// ---------------------------------------------------------------------------------------------
// 8-bit block-wise quantization (bitsandbytes quantize_blockwise, reference rule): absmax per
// block of x (fp32), x/absmax mapped to the nearest entry of `code` (sorted). x any float dtype.
struct Blockwise8 {
  torch::Tensor codes;   // uint8, x's shape
  torch::Tensor absmax;  // fp32 [ceil(n / blocksize)]
};
Blockwise8 quantize_blockwise(const torch::Tensor& x, const std::array<float, 256>& code, int64_t blocksize);
torch::Tensor dequantize_blockwise(const Blockwise8& q, const std::array<float, 256>& code, int64_t blocksize);

// ---------------------------------------------------------------------------------------------
// 4-bit state (bitsandbytes QuantState). Tensors live on one device (CPU or CUDA).
struct State4bit {
  QuantType type = QuantType::nf4;
  int64_t blocksize = 64;
  std::vector<int64_t> shape;                  // original [out, in]
  torch::ScalarType dtype = torch::kBFloat16;  // original dtype (written to the quant_state JSON)
  torch::Tensor packed;                        // uint8 [ceil(n/2)]
  torch::Tensor absmax;                        // fp32 [n_blocks], or uint8 codes when nested
  bool nested = false;                         // double quantization
  int64_t nested_blocksize = 256;
  torch::Tensor nested_absmax;                 // fp32 [ceil(n_blocks/256)]
  torch::Tensor nested_code;                   // fp32 [256]
  float nested_offset = 0.0f;

  int64_t numel() const;
  int64_t n_blocks() const { return (numel() + blocksize - 1) / blocksize; }
  torch::Tensor absmax_fp32() const;  // the recovered per-block scales [n_blocks] fp32
  int64_t bytes() const;              // storage held (packed + scales)
  State4bit to(torch::Device d) const;
};

// Quantizes w (fp32/bf16/fp16, any shape; flattened row-major) like bitsandbytes quantize_4bit
// (+ compress_statistics). blocksize one of 32..4096 (powers of two). The result lives on w's device.
State4bit quantize_4bit(const torch::Tensor& w, QuantType type, bool double_quant, int64_t blocksize = 64);
// Full dequantization to `dtype` (fp32 math, one rounding to dtype), shape = state.shape.
torch::Tensor dequantize_4bit(const State4bit& s, torch::ScalarType dtype);

// bitsandbytes' serialized form (formats.md §6.4): `prefix.weight`, `.weight.absmax`,
// `.weight.quant_map`, nested tensors and `.weight.quant_state.bitsandbytes__nf4` (JSON bytes).
std::vector<std::pair<std::string, torch::Tensor>> state_to_tensors(const State4bit& s, const std::string& weight_name);
// `get(name)` returns a stored tensor or undefined. Errors name `source` and the tensor.
State4bit state_from_tensors(const std::string& weight_name, const std::function<torch::Tensor(const std::string&)>& get,
                             const std::string& source);

// ---------------------------------------------------------------------------------------------
// Kernels. Isa::scalar is the reference every fast path is tested against.
enum class Isa { scalar, avx2, avx512 };
std::string to_string(Isa isa);
Isa detected_isa();                      // best the CPU supports (cpuid)
Isa active_isa();                        // detected, or the override (LLMTUNE_QUANT_ISA=scalar|avx2|avx512)
void set_isa_override(std::optional<Isa> isa);  // tests; refuses an ISA the CPU lacks
bool cuda_kernels_built();               // lib/cuda compiled in

// Dequantizes rows [row0, row0+rows) of a 2-D state into out ([rows, in], fp32 or bf16, CPU,
// contiguous). `absmax` = s.absmax_fp32() (recovered once per call site).
void dequantize_rows(const State4bit& s, const torch::Tensor& absmax, int64_t row0, int64_t rows, torch::Tensor& out,
                     Isa isa);
// y[N, out] = x[N, in] · Wᵀ with W never fully materialised: fused dequantize-and-dot per row for
// small N (GEMV path), tiles of rows dequantized into `compute` dtype then one GEMM for large N.
torch::Tensor matmul_4bit(const torch::Tensor& x, const State4bit& s, const torch::Tensor& absmax,
                          torch::ScalarType compute, std::optional<Isa> isa = std::nullopt);
// dx[N, in] = g[N, out] · W (the backward with respect to the input), tile by tile.
torch::Tensor matmul_4bit_t(const torch::Tensor& g, const State4bit& s, const torch::Tensor& absmax,
                            torch::ScalarType compute, std::optional<Isa> isa = std::nullopt);
// Row budget of one dequantized tile (elements); exposed so tests can force several tiles.
void set_tile_elements(int64_t n);

// ---------------------------------------------------------------------------------------------
// Layers

// Frozen 4-bit weight (buffers `weight` packed, `weight_absmax`..., no weight parameter) and an
// optional frozen `bias` parameter. forward(x) computes in `compute_dtype` and returns x's dtype;
// it is differentiable with respect to x (and bias).
class Linear4bitImpl : public model::LinearBaseImpl {
 public:
  Linear4bitImpl(State4bit state, torch::Tensor bias, torch::ScalarType compute_dtype);
  torch::Tensor forward(const torch::Tensor& x) override;
  int64_t in_features() const override { return state.shape[1]; }
  int64_t out_features() const override { return state.shape[0]; }
  torch::Tensor dequantized(torch::ScalarType dtype) const;  // [out, in]
  std::shared_ptr<model::DenseLinearImpl> to_dense(torch::ScalarType dtype) const;
  void pretty_print(std::ostream& os) const override;
  State4bit state;
  torch::Tensor absmax;  // recovered fp32 scales (cached; 1/16 of the 4-bit payload)
  torch::Tensor bias;
  torch::ScalarType compute_dtype;
};
TORCH_MODULE(Linear4bit);

// LLM.int8-style storage without outlier decomposition: int8 weight with per-row absmax
// (w ≈ q · absmax / 127); dequantized per tile to the compute dtype. For LoRA on 8-bit bases.
class Linear8bitImpl : public model::LinearBaseImpl {
 public:
  Linear8bitImpl(const torch::Tensor& weight, torch::Tensor bias, torch::ScalarType compute_dtype);
  torch::Tensor forward(const torch::Tensor& x) override;
  int64_t in_features() const override { return qweight.size(1); }
  int64_t out_features() const override { return qweight.size(0); }
  torch::Tensor dequantized(torch::ScalarType dtype) const;
  std::shared_ptr<model::DenseLinearImpl> to_dense(torch::ScalarType dtype) const;
  torch::Tensor qweight;  // int8 [out, in]
  torch::Tensor scale;    // fp32 [out]: absmax / 127
  torch::Tensor bias;
  torch::ScalarType compute_dtype;
};
TORCH_MODULE(Linear8bit);


// ---------------------------------------------------------------------------------------------
// GPTQ / AWQ (formats.md §8; lib/quant/gptq.cpp, gptq_linear.cpp): integer codes with one (scale,
// zero) per group of input columns and output row; W[o, i] = scale[g, o] · (q[o, i] − zero[g, o]),
// g = g_idx[i]. H below is the calibration statistic Σ x xᵀ [in, in] (fp32) of the layer's inputs.

struct GroupQuantParams {
  int bits = 4;                 // 4 or 8 (2 for experiments)
  int64_t group_size = 128;     // -1: one group over all inputs; must divide in_features
  bool sym = false;             // GPTQ: symmetric (zero = 2^(bits-1))
  bool act_order = false;       // GPTQ desc_act: columns in order of decreasing H_ii
  double damp_percent = 0.01;   // λ = damp_percent · mean(diag H)
  int64_t block_size = 128;     // GPTQ lazy-update block
  bool awq_quantizer = false;   // AWQ's min/max rule (zero in [0, maxq], range need not hold 0)
};
struct GroupQuantized {
  torch::Tensor q;       // uint8 [out, in] codes 0..2^bits-1, original column order
  torch::Tensor scales;  // fp32 [groups, out]
  torch::Tensor zeros;   // int32 [groups, out], the real zero point
  torch::Tensor g_idx;   // int32 [in]
  int bits = 4;
  int64_t group_size = 128;
  int64_t groups() const;
  torch::Tensor dequantize() const;  // fp32 [out, in]
};
// Round-to-nearest per group (the baseline GPTQ and AWQ are measured against).
GroupQuantized rtn_quantize(const torch::Tensor& w, const GroupQuantParams& p);
// GPTQ: column-by-column quantization with error compensation through the Cholesky factor of H⁻¹.
GroupQuantized gptq_quantize(const torch::Tensor& w, const torch::Tensor& H, const GroupQuantParams& p);
// AWQ scale search for linears sharing one input (q/k/v, gate/up): s = x_absmean^α normalised,
// α on a grid of `grid` steps in [0, 1), minimising Σ tr(E H Eᵀ), E = W − Q(W·s)/s. Returns s [in].
torch::Tensor awq_search_scales(const std::vector<torch::Tensor>& ws, const torch::Tensor& H,
                                const torch::Tensor& x_absmean, const GroupQuantParams& p, double* best_alpha = nullptr,
                                int grid = 20);
// AWQ clip search (shrink each group's |w| range by k/20, k < 10, keep the lowest error), then quantize.
GroupQuantized awq_clip_quantize(const torch::Tensor& w, const torch::Tensor& H, const GroupQuantParams& p, bool clip);
// tr(E H Eᵀ): the summed squared output error of a weight error E [out, in] on the calibration tokens.
double weighted_error(const torch::Tensor& e, const torch::Tensor& H);

// Hugging Face GPTQ layout (AutoGPTQ/optimum/gptqmodel): qweight int32 [in·bits/32, out] packed
// along the input dim (word r holds inputs r·per..r·per+per−1, lowest bits first), qzeros int32
// [groups, out·bits/32] packed along the output dim, scales fp16 [groups, out], g_idx int32 [in].
// checkpoint_format "gptq" (v1) stores zero − 1; "gptq_v2" (v2 = true) stores the zero itself.
std::vector<std::pair<std::string, torch::Tensor>> gptq_pack(const GroupQuantized& g, bool v2 = false);
GroupQuantized gptq_unpack(const torch::Tensor& qweight, const torch::Tensor& qzeros, const torch::Tensor& scales,
                           const torch::Tensor& g_idx, int bits, int64_t group_size, int64_t in, int64_t out, bool v2,
                           const std::string& name);
// AutoAWQ GEMM layout: qweight int32 [in, out/8], qzeros int32 [groups, out/8] packed along the
// output dim with nibble k holding column 8c + [0,2,4,6,1,3,5,7][k]; zeros stored as is; scales fp16.
std::vector<std::pair<std::string, torch::Tensor>> awq_pack(const GroupQuantized& g);
GroupQuantized awq_unpack(const torch::Tensor& qweight, const torch::Tensor& qzeros, const torch::Tensor& scales,
                          int64_t group_size, int64_t in, int64_t out, const std::string& name);

// config.json's quantization_config of a GPTQ/AWQ checkpoint (what llmtune writes and reads).
struct GroupQuantConfig {
  std::string method;  // gptq | awq
  int bits = 4;
  int64_t group_size = 128;
  bool sym = true, desc_act = false, v2 = false;
  nlohmann::json to_json() const;  // the quantization_config written to config.json
  // Parses a quantization_config whose quant_method is gptq or awq; errors (naming `source`) for
  // anything llmtune cannot read (AWQ other than GEMM, bits other than 4/8, unknown checkpoint_format).
  static GroupQuantConfig from_json(const nlohmann::json& j, const std::string& source);
  std::string describe() const;  // e.g. "gptq 4-bit, group 128, asymmetric, act-order"
};

// A frozen GPTQ/AWQ linear: codes kept unpacked (uint8), dequantized on the fly in each forward
// (the dense weight lives only for one matmul, and for backward when x requires grad).
class LinearGroupQuantImpl : public model::LinearBaseImpl {
 public:
  LinearGroupQuantImpl(GroupQuantized g, torch::Tensor bias, torch::ScalarType compute_dtype, std::string method);
  torch::Tensor forward(const torch::Tensor& x) override;
  int64_t in_features() const override { return g.q.size(1); }
  int64_t out_features() const override { return g.q.size(0); }
  std::shared_ptr<model::DenseLinearImpl> to_dense(torch::ScalarType dtype) const;
  void pretty_print(std::ostream& os) const override;
  GroupQuantized g;
  torch::Tensor bias;
  torch::ScalarType compute_dtype;
  std::string method;  // "gptq" | "awq"
  GroupQuantConfig config;  // the checkpoint's quantization_config (set by load_group_quantized)
};
TORCH_MODULE(LinearGroupQuant);

// The checkpoint's quantization_config when quant_method is "gptq" or "awq" (else nullopt).

std::optional<GroupQuantConfig> checkpoint_group_quant(const fs::path& dir);
// Loads a GPTQ/AWQ checkpoint: quantized linears become LinearGroupQuant, others load in `dtype`.
model::Transformer load_group_quantized(const fs::path& dir, const GroupQuantConfig& c, torch::ScalarType dtype,
                                        torch::Device device = torch::kCPU);

// ---------------------------------------------------------------------------------------------
// Loading

struct QuantOptions {
  enum class Bits { none, four, eight } bits = Bits::four;
  QuantType type = QuantType::nf4;
  bool double_quant = true;
  int64_t blocksize = 64;
  torch::ScalarType compute_dtype = torch::kBFloat16;
  // HF-name suffixes left unquantized (lm_head always is, as in transformers).
  std::vector<std::string> skip_modules;
  nlohmann::json to_json() const;  // {"load_in_4bit":..., "bnb_4bit_quant_type":...} (transformers' keys)
  static QuantOptions from_json(const nlohmann::json& j, const std::string& source);
};

// Loads DIR like model::load_pretrained, but the seven per-layer linears become Linear4bit /
// Linear8bit: bf16/fp16/fp32 weights are quantized one tensor at a time (the model never exists
// in 16 bits), a checkpoint saved 4-bit by bitsandbytes (config.json quantization_config, U8
// weights) is read as stored. Other tensors load in `dtype`. Strict like load_pretrained.
model::Transformer load_quantized(const fs::path& dir, const QuantOptions& options, torch::ScalarType dtype,
                                  torch::Device device = torch::kCPU);
// config.json's quantization_config when it says bitsandbytes 4-bit (else nullopt).
std::optional<QuantOptions> checkpoint_quantization(const fs::path& dir);
// Writes a 4-bit model in bitsandbytes' HF layout (config.json with quantization_config).
void save_quantized(model::TransformerImpl& model, const fs::path& dir, const QuantOptions& options);

// Names of quantized linears and the bytes their weights hold (for logs and the benchmark).
std::vector<std::string> quantized_linears(const model::TransformerImpl& model);
int64_t quantized_weight_bytes(const model::TransformerImpl& model);
// 64-bit FNV-1a over every quantized layer's packed bytes and scales (identifies the exact base).
uint64_t quantized_fingerprint(const model::TransformerImpl& model);
// A dense copy of a quantized linear (Linear4bit/Linear8bit) in `dtype` (default: its compute
// dtype); null if `m` is not quantized.
model::LinearPtr dequantize_linear(const model::LinearPtr& m, std::optional<torch::ScalarType> dtype = std::nullopt);

// Which base an adapter was trained against: written beside the adapter as llmtune_qlora.json so
// `llmtune merge` can rebuild the same 4-bit base, merge into its dequantized weights, and warn
// when the base it is given is a different one.
struct BaseRecord {
  std::string base_model;  // as given in the recipe
  QuantOptions options;    // a bitsandbytes base (quantized at load or stored 4-bit)
  std::optional<GroupQuantConfig> group_quant;  // a GPTQ/AWQ checkpoint base (then `options` is unused)
  uint64_t fingerprint = 0;  // quantized_fingerprint of the base at training time
  int64_t n_quantized = 0;
  std::string describe() const;  // "nf4 + double quant, compute bfloat16" / "gptq 4-bit, group 128, ..."
};
void write_base_record(const fs::path& adapter_dir, const BaseRecord& r);
std::optional<BaseRecord> read_base_record(const fs::path& adapter_dir);

}  // namespace llmtune::quant
