// llmtune::exporter — exporting models for other runtimes. Today: GGUF v3 (the file llama.cpp runs):
// ggml block quantizers and dequantizers (scalar reference code), a GGUF reader/writer, and the
// HF-checkpoint -> GGUF converter with llama.cpp's tensor names, Q/K row order, metadata,
// tokenizer and `_M` k-quant mixes. GPTQ/AWQ writers will live beside it (gptq*.cpp, awq*.cpp).
#pragma once
#include "quant/quant.h"
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace llmtune::exporter {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// ggml tensor types (formats.md §7.3; ids are the ggml_type enum values).
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

struct GgmlTypeInfo {
  GgmlType type;
  const char* name;   // ggml's name: "f32", "q4_0", "q6_K"...
  int64_t block;      // elements per block
  int64_t bytes;      // bytes per block
};
const GgmlTypeInfo& ggml_type_info(GgmlType t);
std::optional<GgmlType> ggml_type_from_id(uint32_t id);  // nullopt for types llmtune does not handle
int64_t ggml_row_bytes(GgmlType t, int64_t n);           // n must be a multiple of the block size

// Quantizes n floats (n a multiple of the block size; blocks never straddle rows, so any whole
// number of rows works) into out (ggml_row_bytes(t, n) bytes). Legacy types (q4_0 … q8_0), f16
// and bf16 follow ggml's reference rounding bit for bit; k-quants use llmtune's own scale search.
void ggml_quantize(GgmlType t, const float* x, int64_t n, uint8_t* out);
// Inverse: n floats from ggml_row_bytes(t, n) bytes.
void ggml_dequantize(GgmlType t, const uint8_t* in, int64_t n, float* y);
std::vector<uint8_t> ggml_quantize(GgmlType t, const std::vector<float>& x);
std::vector<float> ggml_dequantize(GgmlType t, const std::vector<uint8_t>& bytes, int64_t n);

uint16_t fp32_to_fp16(float f);  // round to nearest even
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);  // round to nearest even, quiet NaN kept
float bf16_to_fp32(uint16_t h);

// ---------------------------------------------------------------------------------------------
// GGUF files (formats.md §7.1)

enum class GgufValueType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* gguf_value_type_name(GgufValueType t);

// One metadata value. Scalars keep their exact GGUF type; arrays are homogeneous (elem_type).
struct GgufValue {
  GgufValueType type = GgufValueType::UINT32;
  GgufValueType elem_type = GgufValueType::UINT32;  // for ARRAY
  std::variant<uint64_t, int64_t, double, bool, std::string> scalar;
  std::vector<std::variant<uint64_t, int64_t, double, bool, std::string>> array;

  static GgufValue u32(uint32_t v);
  static GgufValue i32(int32_t v);
  static GgufValue f32(float v);
  static GgufValue boolean(bool v);
  static GgufValue str(std::string v);
  static GgufValue str_array(std::vector<std::string> v);
  static GgufValue f32_array(const std::vector<float>& v);
  static GgufValue i32_array(const std::vector<int32_t>& v);

  // Accessors throw llmtune::Error when the type does not fit.
  int64_t as_int() const;
  double as_float() const;
  const std::string& as_string() const;
  bool as_bool() const;
  std::string to_display(size_t max_items = 8) const;  // for `llmtune inspect`
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] fastest (reverse of the torch shape)
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;      // relative to the data section
  int64_t n_elements() const;
  int64_t n_bytes() const;
  std::vector<int64_t> torch_shape() const;
};

struct GgufFile {
  uint32_t version = 3;
  uint32_t alignment = 32;
  std::vector<std::pair<std::string, GgufValue>> metadata;  // in file order
  std::vector<GgufTensorInfo> tensors;                      // in file order
  fs::path path;
  uint64_t data_offset = 0;  // absolute offset of the tensor data section

  const GgufValue* find(const std::string& key) const;
  const GgufValue& at(const std::string& key) const;  // Error naming the file and key when absent
  const GgufTensorInfo* find_tensor(const std::string& name) const;
  // Raw bytes of one tensor, read from `path`.
  std::vector<uint8_t> tensor_bytes(const GgufTensorInfo& t) const;
  // The tensor dequantized to float32, in torch order (shape torch_shape()).
  std::vector<float> tensor_f32(const std::string& name) const;
};

// Parses header, metadata and tensor infos (not the data). Errors name the file, byte offset and
// what is wrong (bad magic, unsupported version, unknown type id, truncated file...).
GgufFile gguf_read(const fs::path& path);
// Human-readable dump: header, every metadata key (long arrays abbreviated) and the tensor table.
std::string gguf_describe(const GgufFile& file);

// Streaming writer: add metadata and tensors, then write(). Tensor data is kept in memory.
class GgufWriter {
 public:
  void set(const std::string& key, GgufValue v);  // replaces an existing key
  // shape in torch order; data already encoded as `type` (ggml_row_bytes(type, ne0) per row).
  void add_tensor(const std::string& name, const std::vector<int64_t>& torch_shape, GgmlType type,
                  std::vector<uint8_t> data);
  void write(const fs::path& path) const;  // writes path.tmp then renames
  uint32_t alignment = 32;

 private:
  struct Entry {
    GgufTensorInfo info;
    std::vector<uint8_t> data;
  };
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<Entry> tensors_;
};

// ---------------------------------------------------------------------------------------------
// HF checkpoint -> GGUF

// The user-facing `--type` names (llama.cpp's ftype names, lower case).
struct GgufFileType {
  std::string name;       // "q4_k_m"
  GgmlType base;          // the type most 2-D weights get
  uint32_t llama_ftype;   // general.file_type (llama_ftype enum)
};
const std::vector<GgufFileType>& gguf_file_types();
const GgufFileType& gguf_file_type(const std::string& name);  // Error with did-you-mean

// The type llama.cpp's quantizer would give one tensor (llama_tensor_get_type for the `_M` mixes,
// the output.weight -> q6_K rule, and the fallback for rows not divisible by the block size).
// `name` is the GGUF tensor name; `ne0` the row length; layer_index/n_layers count the tensors of
// that kind (attn_v / ffn_down) seen so far; n_gqa = heads / kv heads.
struct TensorTypeContext {
  int64_t ne0 = 0;
  int64_t n_dims = 2;
  int64_t i_attn_v = 0, n_attn_v = 0, i_ffn_down = 0, n_ffn_down = 0;
  int64_t n_gqa = 1;
  bool has_output = true;  // false when the embedding is tied (token_embd doubles as output)
};
GgmlType gguf_tensor_type(const GgufFileType& ft, const std::string& name, const TensorTypeContext& ctx);

struct GgufExportOptions {
  fs::path model_dir;
  std::vector<fs::path> adapters;  // merged in order before export
  std::string type = "f16";
  fs::path out;
  std::string name;                // general.name (default: the model directory's name)
};
struct GgufExportReport {
  int64_t n_tensors = 0, n_params = 0, file_bytes = 0;
  double bits_per_weight = 0;      // over all tensor data (file bytes of tensors * 8 / params)
  double seconds = 0;
  std::map<std::string, int64_t> type_counts;  // ggml type name -> tensors
  std::vector<std::string> warnings;
};
// Loads the checkpoint (fp32), merges adapters, maps names, permutes Q/K, quantizes, writes metadata
// and the tokenizer. Throws llmtune::Error for unsupported architectures/tokenizers/shapes.
GgufExportReport export_gguf(const GgufExportOptions& options);


// GPTQ / AWQ checkpoints in the Hugging Face layouts (formats.md §8; lib/export/gptq_export.cpp).
struct GroupQuantExportOptions {
  fs::path model_dir;
  std::string method = "gptq";      // gptq | awq
  quant::GroupQuantParams params;   // bits, group_size, sym, act_order, damp_percent
  fs::path calib;                   // .txt or .jsonl ("text")
  int64_t calib_samples = 128, calib_seqlen = 512, batch = 8;
  bool rtn = false;                 // round-to-nearest baseline in the same layout (no calibration)
  fs::path out;                     // output directory
};
struct GroupQuantExportReport {
  int64_t n_linears = 0, file_bytes = 0;
  double seconds = 0;
  double relative_output_error = 0;  // Σ tr(E H Eᵀ) / Σ tr(W H Wᵀ) on the calibration inputs (0 for rtn)
};
GroupQuantExportReport export_group_quant(const GroupQuantExportOptions& options);

}  // namespace llmtune::exporter
