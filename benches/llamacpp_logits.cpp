// Logits of every position of a token sequence from llama.cpp, for parity checks of whittle's
// GGUF exports (benches/gguf_parity.sh). Token ids come in on the command line so that both
// runtimes see the same sequence whatever their tokenizers do; one JSON array of rows goes out.
//   llamacpp_logits MODEL.gguf ID,ID,...  > rows.json
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.gguf ID,ID,...\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> ids;
    std::stringstream ss(argv[2]);
    for (std::string t; std::getline(ss, t, ',');) ids.push_back(std::atoi(t.c_str()));
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "llama.cpp could not load %s\n", argv[1]); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = ids.size() + 8;
    cp.n_batch = cp.n_ubatch = ids.size();
    cp.n_threads = cp.n_threads_batch = 2;
    cp.type_k = cp.type_v = GGML_TYPE_F32;  // an exact cache, as whittle's default
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;  // its CPU kernel rounds Q to f16
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "no context\n"); return 1; }
    llama_batch b = llama_batch_init(ids.size(), 0, 1);
    for (size_t i = 0; i < ids.size(); i++) {
        b.token[i] = ids[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = ids.size();
    if (llama_decode(ctx, b) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    printf("[");
    for (size_t i = 0; i < ids.size(); i++) {
        const float * row = llama_get_logits_ith(ctx, i);
        printf(i ? ",[" : "[");
        for (int j = 0; j < nv; j++) printf(j ? ",%.7g" : "%.7g", row[j]);
        printf("]");
    }
    printf("]\n");
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
