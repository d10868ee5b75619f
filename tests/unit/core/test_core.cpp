#include <catch2/catch.hpp>

#include "core/core.h"

using namespace llmtune;

TEST_CASE("edit distance and closest match suggest the intended key") {
  CHECK(edit_distance("kitten", "sitting") == 3);
  CHECK(edit_distance("", "abc") == 3);
  auto m = closest_match("lora_alhpa", {"lora_alpha", "lora_r", "learning_rate"});
  REQUIRE(m.has_value());
  CHECK(*m == "lora_alpha");
  CHECK_FALSE(closest_match("zzzzzzzzzz", {"lora_alpha", "seed"}).has_value());
}

TEST_CASE("fail throws a user-facing Error with the formatted message") {
  try {
    fail("tensor {} has shape {}", "a.weight", "[2, 3]");
    FAIL("fail() returned");
  } catch (const Error& e) {
    CHECK(std::string(e.what()) == "tensor a.weight has shape [2, 3]");
  }
}

TEST_CASE("human-readable sizes and durations") {
  CHECK(human_bytes(1536) == "1.5 KiB");
  CHECK(human_duration(3725) == "1h02m05s");
  CHECK(human_duration(59) == "59s");
  CHECK(peak_rss_bytes() > 0);
}
