// gen_ids: greedy generation from token ids with libllama, timed the way `make bench`
// times every variant (gpt2onnx/bench/peer_llamacpp.py runs it once per decode call).
//
//   gen_ids -m MODEL.gguf -n NEW_TOKENS [-b BATCH] [-t THREADS] [--kv f32|f16]
//           [--fa auto|on|off] [--temp T --top-p P --seed S] [-v]  < "id id id ..."
//
// Greedy unless --temp is given: then temperature, top-p and a seeded draw, in that order
// (the order transformers applies them), one chain over all rows.
// stdin holds the prompt's token ids (whitespace-separated). BATCH rows all get that
// prompt, each as its own sequence (seq_id = row) in one llama_batch. The prefill (which
// yields the first token) and each of the NEW_TOKENS - 1 decode steps after it are timed
// on a steady clock, sampling included, and one JSON line goes to stdout:
//   {"prefill_ms": .., "step_ms": [..], "tokens": [row 0's tokens], "load_ms": .., ...}
// Errors: one line on stderr, exit status 1 (bad usage 2).

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

[[noreturn]] void fail(const std::string & msg, int code = 1) {
    std::fprintf(stderr, "gen_ids: %s\n", msg.c_str());
    std::exit(code);
}

struct Args {
    std::string model;
    int new_tokens = 0;
    int batch = 1;
    int threads = 0;  // 0: std::thread::hardware_concurrency()
    std::string kv = "f16";
    std::string fa = "auto";
    float temp = 0.0f;  // 0: greedy
    float top_p = 1.0f;
    int seed = 0;
    bool verbose = false;
};

float to_float(const std::string & flag, const char * text, float lo, float hi) {
    char * end = nullptr;
    float v = std::strtof(text, &end);
    if (end == text || *end != '\0' || !(v >= lo && v <= hi)) {
        char range[64];
        std::snprintf(range, sizeof range, "[%g, %g]", lo, hi);
        fail(flag + " " + text + ": expected a number in " + range, 2);
    }
    return v;
}

int to_int(const std::string & flag, const char * text, int lo) {
    char * end = nullptr;
    long v = std::strtol(text, &end, 10);
    if (end == text || *end != '\0' || v < lo || v > 1000000) {
        fail(flag + " " + text + ": expected an integer >= " + std::to_string(lo), 2);
    }
    return static_cast<int>(v);
}

Args parse(int argc, char ** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string f = argv[i];
        auto value = [&]() -> const char * {
            if (i + 1 >= argc) fail(f + " needs a value", 2);
            return argv[++i];
        };
        if (f == "-m") a.model = value();
        else if (f == "-n") a.new_tokens = to_int(f, value(), 1);
        else if (f == "-b") a.batch = to_int(f, value(), 1);
        else if (f == "-t") a.threads = to_int(f, value(), 0);
        else if (f == "--kv") a.kv = value();
        else if (f == "--fa") a.fa = value();
        else if (f == "--temp") a.temp = to_float(f, value(), 0.0f, 100.0f);
        else if (f == "--top-p") a.top_p = to_float(f, value(), 0.0f, 1.0f);
        else if (f == "--seed") a.seed = to_int(f, value(), 0);
        else if (f == "-v") a.verbose = true;
        else fail("unknown argument " + f + " (see the usage at the top of gen_ids.cpp)", 2);
    }
    if (a.model.empty()) fail("-m MODEL.gguf is required", 2);
    if (a.new_tokens < 1) fail("-n NEW_TOKENS (>= 1) is required", 2);
    if (a.kv != "f32" && a.kv != "f16") fail("--kv " + a.kv + ": use f32 or f16", 2);
    if (a.fa != "auto" && a.fa != "on" && a.fa != "off") {
        fail("--fa " + a.fa + ": use auto, on or off", 2);
    }
    if (a.threads == 0) a.threads = std::max(1u, std::thread::hardware_concurrency());
    return a;
}

// libllama logs every load step at INFO; keep stderr for errors unless -v.
void quiet_log(ggml_log_level level, const char * text, void * verbose) {
    if (verbose != nullptr || level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

// One token per row; rows are sequences 0..B-1 at position `pos`, every row outputs logits.
void fill_step(llama_batch & b, const std::vector<llama_token> & next, int pos) {
    b.n_tokens = 0;
    for (size_t row = 0; row < next.size(); ++row) {
        int i = b.n_tokens++;
        b.token[i] = next[row];
        b.pos[i] = pos;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = static_cast<llama_seq_id>(row);
        b.logits[i] = 1;
    }
}

}  // namespace

int main(int argc, char ** argv) {
    Args a = parse(argc, argv);

    std::vector<llama_token> prompt;
    for (long id; std::cin >> id;) prompt.push_back(static_cast<llama_token>(id));
    if (!std::cin.eof()) fail("stdin: expected whitespace-separated integer token ids");
    if (prompt.empty()) fail("stdin: no prompt token ids");

    llama_log_set(quiet_log, a.verbose ? &a : nullptr);
    auto t_load = Clock::now();
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;  // the bench compares CPU runtimes
    llama_model * model = llama_model_load_from_file(a.model.c_str(), mp);
    if (model == nullptr) fail("could not load " + a.model + " (is it a GGUF file?)");

    const int n_prompt = static_cast<int>(prompt.size());
    const int per_seq = n_prompt + a.new_tokens;
    // GPT-2's learned position table ends at n_ctx_train: a longer text has no positions.
    const int n_train = llama_model_n_ctx_train(model);
    if (per_seq > n_train) {
        fail("prompt (" + std::to_string(n_prompt) + ") + new tokens (" +
             std::to_string(a.new_tokens) + ") = " + std::to_string(per_seq) +
             " exceeds the model's context " + std::to_string(n_train) + "; ask for fewer");
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (llama_token id : prompt) {
        if (id < 0 || id >= n_vocab) {
            fail("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                 std::to_string(n_vocab) + ")");
        }
    }

    llama_context_params cp = llama_context_default_params();
    // Each row gets its own cells: n_ctx is the total over all sequences.
    cp.n_ctx = static_cast<uint32_t>(per_seq * a.batch);
    cp.n_batch = static_cast<uint32_t>(std::max(n_prompt * a.batch, a.batch));
    cp.n_ubatch = std::min<uint32_t>(cp.n_batch, 512);
    cp.n_seq_max = static_cast<uint32_t>(a.batch);
    cp.n_threads = a.threads;
    cp.n_threads_batch = a.threads;
    cp.no_perf = true;
    const ggml_type kv = a.kv == "f32" ? GGML_TYPE_F32 : GGML_TYPE_F16;
    cp.type_k = kv;
    cp.type_v = kv;
    cp.flash_attn_type = a.fa == "on" ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                         : a.fa == "off" ? LLAMA_FLASH_ATTN_TYPE_DISABLED
                                         : LLAMA_FLASH_ATTN_TYPE_AUTO;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) fail("could not create a context (n_ctx " + std::to_string(cp.n_ctx) + ")");

    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (a.temp > 0.0f) {
        llama_sampler_chain_add(smpl, llama_sampler_init_temp(a.temp));
        llama_sampler_chain_add(smpl, llama_sampler_init_top_p(a.top_p, 1));
        llama_sampler_chain_add(smpl, llama_sampler_init_dist(static_cast<uint32_t>(a.seed)));
    } else {
        llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    }
    const double load_ms = ms_since(t_load);

    llama_batch batch = llama_batch_init(std::max(n_prompt * a.batch, a.batch), 0, 1);
    // Prefill: every row's prompt, one sequence per row; logits only at each row's end.
    batch.n_tokens = 0;
    for (int row = 0; row < a.batch; ++row) {
        for (int p = 0; p < n_prompt; ++p) {
            int i = batch.n_tokens++;
            batch.token[i] = prompt[p];
            batch.pos[i] = p;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = row;
            batch.logits[i] = p == n_prompt - 1;
        }
    }
    std::vector<llama_token> next(a.batch);
    std::vector<llama_token> row0;
    std::vector<double> step_ms;
    row0.reserve(a.new_tokens);
    step_ms.reserve(a.new_tokens);

    auto t0 = Clock::now();
    if (int rc = llama_decode(ctx, batch); rc != 0) fail("prefill: llama_decode returned " + std::to_string(rc));
    for (int row = 0; row < a.batch; ++row) {
        // Row r's output is batch index (r + 1) * n_prompt - 1.
        next[row] = llama_sampler_sample(smpl, ctx, (row + 1) * n_prompt - 1);
    }
    const double prefill_ms = ms_since(t0);
    row0.push_back(next[0]);

    for (int s = 1; s < a.new_tokens; ++s) {
        // Building the batch is part of a step, as it is in every other engine's loop.
        t0 = Clock::now();
        fill_step(batch, next, n_prompt + s - 1);
        if (int rc = llama_decode(ctx, batch); rc != 0) {
            fail("step " + std::to_string(s) + ": llama_decode returned " + std::to_string(rc));
        }
        for (int row = 0; row < a.batch; ++row) next[row] = llama_sampler_sample(smpl, ctx, row);
        step_ms.push_back(ms_since(t0));
        row0.push_back(next[0]);
    }

    std::string out = "{\"prefill_ms\": " + std::to_string(prefill_ms) + ", \"step_ms\": [";
    for (size_t i = 0; i < step_ms.size(); ++i) out += (i ? ", " : "") + std::to_string(step_ms[i]);
    out += "], \"tokens\": [";
    for (size_t i = 0; i < row0.size(); ++i) out += (i ? ", " : "") + std::to_string(row0[i]);
    out += "], \"load_ms\": " + std::to_string(load_ms) + ", \"threads\": " +
           std::to_string(a.threads) + ", \"kv\": \"" + a.kv + "\", \"flash_attn\": \"" +
           llama_flash_attn_type_name(cp.flash_attn_type) + "\", \"llama_system_info\": \"" +
           llama_print_system_info() + "\"}";
    std::puts(out.c_str());

    llama_batch_free(batch);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
