"""llama.cpp (via llama-cpp-python) with the reference protocol, for a same-run comparison:
prefill = one eval of T prompt tokens (last logits only); decode = 127 greedy one-token steps
after a 128-token prompt. Median of 3 runs after a warm-up.
  python benches/llamacpp_bench.py MODEL.gguf TEXT [THREADS]"""
import statistics, sys, time
import numpy as np
from llama_cpp import Llama

path, text_path = sys.argv[1], sys.argv[2]
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
            n_batch=2048, n_ubatch=512, logits_all=False, verbose=False)
ids = llm.tokenize(open(text_path, encoding="utf-8").read()[:200000].encode(), add_bos=False)

def timed(f, reps=3):
    f()
    runs = []
    for _ in range(reps):
        t = time.perf_counter(); f(); runs.append(time.perf_counter() - t)
    return statistics.median(runs)

for T in (512, 2048):
    def prefill():
        llm.reset(); llm.eval(ids[:T])
    s = timed(prefill)
    print(f"llama.cpp prefill {T}: {T / s:.1f} tok/s")

def decode():
    llm.reset(); llm.eval(ids[:128])
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(127):
        llm.eval([nxt]); nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return time.perf_counter() - t
decode()
d = statistics.median(decode() for _ in range(3))
print(f"llama.cpp decode: {127 / d:.1f} tok/s")
