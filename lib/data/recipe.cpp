// Recipe -> DataOptions: the one place that knows which config::Recipe / DatasetConfig keys feed the data
// pipeline. Keys the config module does not have yet (weight, text_split, skip_invalid, min_sample_len) keep
// their DataOptions defaults here.
#include "config/config.h"
#include "core/core.h"
#include "data/data.h"

namespace llmtune::data {

DataOptions options_from_recipe(const config::Recipe& r) {
  DataOptions o;
  for (size_t i = 0; i < r.datasets.size(); ++i) {
    const auto& d = r.datasets[i];
    if (!d.path || d.path->empty()) fail("datasets[{}]: `path` is required (a .jsonl/.json/.csv/.txt file)", i);
    DatasetSpec s;
    s.path = *d.path;
    s.type = d.type.value_or("alpaca");
    if (d.ds_type) s.ds_type = *d.ds_type;
    if (!d.data_files.empty()) {
      if (d.data_files.size() > 1)
        fail("datasets[{}]: several data_files in one entry are not supported; give each file its own entry", i);
      s.path = (std::filesystem::path(*d.path) / d.data_files[0]).string();
    }
    if (d.field_instruction) s.field_instruction = *d.field_instruction;
    if (d.field_input) s.field_input = *d.field_input;
    if (d.field_output) s.field_output = *d.field_output;
    if (d.field_system) s.field_system = *d.field_system;
    s.field = d.text_column.value_or(d.field);
    s.field_messages = d.field_messages;
    s.message_property_mappings = d.message_property_mappings;
    s.roles = d.roles;
    s.roles_to_train = d.roles_to_train;
    s.train_on_eos = d.train_on_eos;
    s.train_on_eot = d.train_on_eot;
    s.drop_system_message = d.drop_system_message;
    if (d.chat_template_jinja && !d.chat_template_jinja->empty()) s.chat_template = *d.chat_template_jinja;
    else if (d.chat_template && *d.chat_template != "jinja") s.chat_template = *d.chat_template;
    o.datasets.push_back(std::move(s));
  }
  o.sequence_len = r.sequence_len;
  o.train_on_inputs = r.train_on_inputs;
  o.eot_tokens = r.eot_tokens;
  if (r.chat_template == std::optional<std::string>("jinja")) {
    if (!r.chat_template_jinja || r.chat_template_jinja->empty())
      fail("chat_template: jinja needs chat_template_jinja: <the template source>");
    o.chat_template = *r.chat_template_jinja;
  } else if (r.chat_template) {
    o.chat_template = *r.chat_template;
  } else if (r.chat_template_jinja) {
    o.chat_template = *r.chat_template_jinja;
  }
  o.excess_length_strategy = r.excess_length_strategy;
  o.val_set_size = r.val_set_size;
  o.seed = static_cast<uint64_t>(r.seed);
  if (r.dataset_prepared_path) o.dataset_prepared_path = *r.dataset_prepared_path;
  return o;
}

}  // namespace llmtune::data
