"""Where a fresh generate process's time goes around the model's load, with and without the prompt feed (diagnostic)."""
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

t0 = time.perf_counter()
feed_on = sys.argv[1] == "feed"
import embedkit
import embedkit.engine.tokenize as tk
import embedkit.generation.feed as feed_module
import embedkit.generation.model as model
from embedkit.run.record import marks

feed_module.PROMPTS_AHEAD = feed_on
log = []
orig_get, orig_load, orig_init = tk.PendingTokens.get, model.AutoModelForCausalLM if hasattr(model, "AutoModelForCausalLM") else None, tk.TokenizerPool.__init__


def get(self):
    t = time.perf_counter()
    r = orig_get(self)
    log.append(("pending.get", round(t - t0, 3), round(time.perf_counter() - t, 3)))
    return r


def init(self, *a, **k):
    t = time.perf_counter()
    orig_init(self, *a, **k)
    log.append(("pool init", round(t - t0, 3), round(time.perf_counter() - t, 3)))


import embedkit.engine.decode as dec
import embedkit.generation.tasks as tasks

orig_dec_init, orig_summarize, orig_run = dec.SlotDecoder.__init__, tasks.summarize, dec.SlotDecoder.run


def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        r = fn(*a, **k)
        log.append((name, round(t - t0, 3), round(time.perf_counter() - t, 3)))
        return r
    return wrapper


dec.SlotDecoder.__init__ = timed("decoder init", orig_dec_init)
dec.SlotDecoder.run = timed("decoder run", orig_run)
tasks.summarize = timed("summarize", orig_summarize)
model.load_generator = timed("load_generator", model.load_generator)
import embedkit.generation.pipeline as pl
pl.load_generator = model.load_generator
tk.PendingTokens.get, tk.TokenizerPool.__init__ = get, init
texts = pq.read_table(sys.argv[2], columns=["text"]).column("text").slice(0, 20000)
pq.write_table(pa.table({"id": [f"d{i}" for i in range(20000)], "text": texts}), "/tmp/diag.parquet")
t_imp = time.perf_counter() - t0
s = embedkit.generate("/tmp/diag.parquet", f"/tmp/diag-{sys.argv[1]}-{time.time()}", model=sys.argv[3], progress=False)
print(sys.argv[1], "imports", round(t_imp, 2), "total", round(time.perf_counter() - t0, 2), "seconds", round(s.seconds, 2), s.phases,
      "decoder", round(s.decode["seconds"], 2), "prefill", round(s.decode["prefill_s"], 2), marks(), log)
