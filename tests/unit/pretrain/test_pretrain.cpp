// Unit tests for lib/pretrain: MinHash against exact Jaccard, the streaming filters, cld2 language id,
// the token cache (contents equal the tokenizer's output, mmap round trip, cache hits), and the window
// stream (contents, document masks, rank sharding, exact resume from a saved state). Self-contained:
// a small SentencePiece tokenizer is trained by train_tokenizer on generated text.
#include <catch2/catch.hpp>
#include <unistd.h>

#include <fstream>
#include <random>
#include <set>

#include "pretrain/pretrain.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using namespace llmtune;

namespace {

// Every scratch directory this process made, removed when the test binary exits.
struct ScratchDirs {
  std::vector<fs::path> made;
  ~ScratchDirs() {
    std::error_code ec;
    for (const auto& d : made) fs::remove_all(d, ec);
  }
} scratch_dirs;

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("llmtune-test-pretrain-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  scratch_dirs.made.push_back(d);
  return d;
}

const std::vector<std::string> kWords = {"the", "king", "said", "unto", "them", "go", "ye", "into", "land",
                                         "and", "all", "people", "were", "glad", "for", "of", "a", "house",
                                         "river", "morning", "light", "stone", "bread", "road", "north"};

std::string sentence(std::mt19937& rng, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += (i ? " " : "") + kWords[rng() % kWords.size()];
  return s + ".";
}

// A corpus of paragraphs and a tokenizer trained on it (once per test binary).
struct Fixture {
  fs::path dir, corpus, tok_dir;
  std::vector<std::string> docs;
  std::unique_ptr<tok::Tokenizer> tokenizer;
};
Fixture& fixture() {
  static Fixture f = [] {
    Fixture x;
    x.dir = temp_dir("fixture");
    x.corpus = x.dir / "corpus.txt";
    std::mt19937 rng(5);
    std::ofstream out(x.corpus);
    for (int d = 0; d < 60; ++d) {
      std::string doc = sentence(rng, 8 + static_cast<int>(rng() % 20));
      x.docs.push_back(doc);
      out << doc << "\n\n";
    }
    out.close();
    pretrain::TokenizerTrainOptions o;
    o.inputs = {x.corpus};
    o.vocab_size = 300;
    o.out = x.tok_dir = x.dir / "tok";
    o.threads = 1;
    pretrain::train_tokenizer(o);
    x.tokenizer = tok::Tokenizer::load(x.tok_dir);
    return x;
  }();
  return f;
}

std::set<std::string> shingles(const std::string& s, int n) {
  std::vector<std::string> w;
  std::string cur;
  for (char c : s) {
    if (c == ' ') {
      if (!cur.empty()) w.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) w.push_back(cur);
  std::set<std::string> out;
  for (size_t i = 0; i + n <= w.size(); ++i) {
    std::string g;
    for (int k = 0; k < n; ++k) g += (k ? " " : "") + w[i + k];
    out.insert(g);
  }
  return out;
}

}  // namespace

TEST_CASE("minhash similarity estimates the exact Jaccard similarity of shingle sets") {
  std::mt19937 rng(1);
  std::string a = sentence(rng, 200);
  // b: a with ~10% of the words replaced.
  std::string b;
  {
    std::mt19937 r2(2);
    std::string w;
    for (char c : a + " ") {
      if (c == ' ') {
        if (!w.empty()) b += (b.empty() ? "" : " ") + ((r2() % 10 == 0) ? std::string("zebra") : w);
        w.clear();
      } else {
        w += c;
      }
    }
  }
  const auto sa = shingles(a, 3), sb = shingles(b, 3);
  std::vector<std::string> inter;
  std::set_intersection(sa.begin(), sa.end(), sb.begin(), sb.end(), std::back_inserter(inter));
  std::set<std::string> uni(sa);
  uni.insert(sb.begin(), sb.end());
  const double exact = double(inter.size()) / double(uni.size());
  const auto ma = pretrain::minhash_signature(a, 256, 3, 9), mb = pretrain::minhash_signature(b, 256, 3, 9);
  // Standard error of the estimate is sqrt(J(1-J)/k) <= 0.031 for k = 256; allow 4 sigma.
  CHECK(std::abs(pretrain::minhash_similarity(ma, mb) - exact) < 0.125);
  CHECK(pretrain::minhash_similarity(ma, ma) == 1.0);
  std::mt19937 r3(77);
  const auto mc = pretrain::minhash_signature(sentence(r3, 200), 256, 3, 9);
  CHECK(pretrain::minhash_similarity(ma, mc) < 0.3);
}

TEST_CASE("document filters count what they remove, in order") {
  auto cfg = pretrain::FilterConfig::from_json(nlohmann::json::parse(
      R"({"min_chars": 10, "max_chars": 400, "dedup": true, "near_dedup": {"threshold": 0.7, "num_perm": 64, "bands": 16, "ngram": 3}})"));
  pretrain::DocumentFilter f(cfg);
  std::mt19937 rng(3);
  const std::string base = sentence(rng, 40);
  CHECK(f.check("short") == "min_chars");
  CHECK(f.check(std::string(500, 'x')) == "max_chars");
  CHECK(f.check(base).empty());
  CHECK(f.check("  " + base + "\n") == "dedup");  // trimmed text is the identity
  std::string near = base;
  near.replace(0, 3, "THE");                        // case-folded shingles: identical set
  CHECK(f.check(near + " extra") == "near_dedup");
  CHECK(f.check(sentence(rng, 40)).empty());
}

TEST_CASE("filter config errors name the key") {
  CHECK_THROWS_WITH(pretrain::FilterConfig::from_json(nlohmann::json::parse(R"({"min_char": 3})")),
                    Catch::Contains("min_char") && Catch::Contains("min_chars"));
  CHECK_THROWS_WITH(pretrain::FilterConfig::from_json(nlohmann::json::parse(R"({"near_dedup": {"num_perm": 100, "bands": 16}})")),
                    Catch::Contains("multiple of bands"));
  CHECK_THROWS_WITH(pretrain::FilterConfig::from_json(nlohmann::json::parse(R"({"perplexity": {"drop_fraction": 0.1}})")),
                    Catch::Contains("perplexity.model"));
}

TEST_CASE("language id through libcld2") {
  std::string why;
  const bool available = pretrain::language_id_available(&why);
  INFO(why);
  REQUIRE(available);
  auto en = pretrain::detect_language("The quick brown fox jumps over the lazy dog while the farmer watches from the barn.");
  CHECK(en.code == "en");
  auto fr = pretrain::detect_language("Le renard brun saute par-dessus le chien paresseux pendant que le fermier regarde depuis la grange.");
  CHECK(fr.code == "fr");
  auto cfg = pretrain::FilterConfig::from_json(nlohmann::json::parse(R"({"language": ["en"]})"));
  pretrain::DocumentFilter f(cfg);
  CHECK(f.check("Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer aus der Scheune zusieht.") == "language");
  CHECK(f.check("The quick brown fox jumps over the lazy dog while the farmer watches from the barn.").empty());
}

TEST_CASE("token cache holds exactly the tokenizer's ids plus EOS per document") {
  auto& fx = fixture();
  const fs::path root = temp_dir("cache");
  pretrain::CacheOptions co;
  co.sources = {{fx.corpus.string(), "auto", "paragraph", "text"}};
  co.cache_root = root;
  co.chunk_bytes = 200;  // many chunks
  auto built = pretrain::build_cache(co, *fx.tokenizer);
  CHECK_FALSE(built.hit);
  auto cache = pretrain::TokenCache::open(built.dir);
  REQUIRE(cache.num_documents() == static_cast<int64_t>(fx.docs.size()));
  std::vector<int64_t> expect;
  for (const auto& d : fx.docs) {
    auto ids = fx.tokenizer->encode(d, true);
    ids.push_back(*fx.tokenizer->eos_id());
    expect.insert(expect.end(), ids.begin(), ids.end());
  }
  REQUIRE(cache.num_tokens() == static_cast<int64_t>(expect.size()));
  std::vector<int64_t> got(expect.size());
  cache.read(0, cache.num_tokens(), got.data());
  CHECK(got == expect);
  CHECK(cache.document_of(0) == 0);
  CHECK(cache.document_of(cache.document_start(5)) == 5);
  CHECK(cache.document_of(cache.document_start(5) - 1) == 4);
  CHECK(cache.meta()["token_bytes"] == 2);
  auto again = pretrain::build_cache(co, *fx.tokenizer);
  CHECK(again.hit);
  CHECK(again.dir == built.dir);
  CHECK(again.report.documents_out == cache.num_documents());
  fs::remove_all(root);
}

TEST_CASE("windows: contents, document masks, sharding and exact resume") {
  auto& fx = fixture();
  const fs::path root = temp_dir("windows");
  pretrain::CacheOptions co;
  co.sources = {{fx.corpus.string(), "auto", "paragraph", "text"}};
  co.cache_root = root;
  auto cache = std::make_shared<const pretrain::TokenCache>(pretrain::TokenCache::open(pretrain::build_cache(co, *fx.tokenizer).dir));
  pretrain::WindowOptions wo;
  wo.sequence_len = 16;
  wo.batch_size = 2;
  wo.seed = 11;
  pretrain::WindowSource src(cache, wo);
  const int64_t W = cache->num_tokens() / 16;
  REQUIRE(src.num_windows() == W);
  REQUIRE(src.batches_per_epoch() == W / 2);

  // Every window of the epoch appears once and holds the cache's tokens.
  std::set<std::vector<int64_t>> seen;
  std::vector<train::Batch> epoch0;
  while (auto b = src.next()) epoch0.push_back(*b);
  REQUIRE(static_cast<int64_t>(epoch0.size()) == W / 2);
  std::set<std::vector<int64_t>> all_windows;
  for (int64_t w = 0; w < W; ++w) {
    std::vector<int64_t> t(16);
    cache->read(w * 16, 16, t.data());
    all_windows.insert(t);
  }
  for (const auto& b : epoch0) {
    CHECK(torch::equal(b.input_ids, b.labels));
    CHECK(b.num_target_tokens == 2 * 15);
    for (int r = 0; r < 2; ++r) {
      auto row = b.input_ids[r].contiguous();
      std::vector<int64_t> v(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + 16);
      CHECK(all_windows.count(v) == 1);
      seen.insert(v);
    }
  }
  CHECK(static_cast<int64_t>(seen.size()) == (W / 2) * 2);

  // Resume: a state saved after 3 batches continues with the same batches; next epoch differs.
  pretrain::WindowSource a(cache, wo);
  for (int i = 0; i < 3; ++i) a.next();
  auto st = a.state();
  pretrain::WindowSource b(cache, wo);
  b.load_state(st);
  for (size_t i = 3; i < epoch0.size(); ++i) {
    auto x = b.next();
    REQUIRE(x);
    CHECK(torch::equal(x->input_ids, epoch0[i].input_ids));
  }
  CHECK_FALSE(b.next());
  b.set_epoch(1);
  CHECK_FALSE(torch::equal(b.next()->input_ids, epoch0[0].input_ids));
  pretrain::WindowOptions other = wo;
  other.sequence_len = 8;
  pretrain::WindowSource c(cache, other);
  CHECK_THROWS_WITH(c.load_state(st), Catch::Contains("sequence_len"));

  // Two ranks split the epoch's batches between them without overlap.
  pretrain::WindowOptions r0 = wo, r1 = wo;
  r0.world_size = r1.world_size = 2;
  r1.rank = 1;
  pretrain::WindowSource s0(cache, r0), s1(cache, r1);
  CHECK(s0.batches_per_epoch() == (W / 2) / 2);
  CHECK(torch::equal(s0.next()->input_ids, epoch0[0].input_ids));
  CHECK(torch::equal(s1.next()->input_ids, epoch0[1].input_ids));

  // Document mask: segments change exactly at document starts; positions restart; first tokens untrained.
  pretrain::WindowOptions dm = wo;
  dm.document_mask = true;
  dm.shuffle = false;
  pretrain::WindowSource d(cache, dm);
  auto batch = *d.next();
  for (int64_t r = 0; r < 2; ++r) {
    const int64_t start = r * 16;
    int64_t targets = 0;
    for (int64_t t = 0; t < 16; ++t) {
      const int64_t at = start + t, doc = cache->document_of(at);
      const int64_t seg_start = std::max(start, cache->document_start(doc));
      CHECK(batch.position_ids[r][t].item<int64_t>() == at - seg_start);
      CHECK(batch.segment_ids[r][t].item<int64_t>() == doc - cache->document_of(start) + 1);
      const bool boundary = t > 0 && at == cache->document_start(doc);
      CHECK(batch.labels[r][t].item<int64_t>() == (boundary ? -100 : batch.input_ids[r][t].item<int64_t>()));
      if (t > 0 && !boundary) ++targets;
    }
    (void)targets;
  }
  CHECK(batch.num_target_tokens == batch.labels.slice(1, 1).ne(-100).sum().item<int64_t>());
  fs::remove_all(root);
}

TEST_CASE("tokenizer train writes files that llmtune loads with the same ids as sentencepiece") {
  auto& fx = fixture();
  auto spm = tok::Tokenizer::load(fx.tok_dir / "tokenizer.model");
  auto hf = tok::Tokenizer::load(fx.tok_dir);  // tokenizer.json (BPE)
  CHECK(hf->engine() != spm->engine());
  std::mt19937 rng(99);
  for (int i = 0; i < 20; ++i) {
    const std::string s = sentence(rng, 12) + " 1234 Zebra? \xc3\xa9t\xc3\xa9";
    CHECK(hf->encode(s, true) == spm->encode(s, true));
    CHECK(hf->decode(hf->encode(s, false)) == s);
  }
  CHECK(hf->token_to_id("<|im_start|>") == 3);
  CHECK(hf->token_to_id("<|im_end|>") == 4);
  CHECK(hf->eos_id() == 2);
  CHECK(hf->bos_id() == 1);
  CHECK_FALSE(hf->chat_template().empty());
}
