"""XLA's memory analysis (MiB) of the engine's chunk program at widths 1 and 2, for the
MiniLM-size encoder (`preset mini`, random weights: sizes only), Adam, 4 steps x batch 8 x
length 64, with LoRA R = 8 on query,value or full fine-tuning, with or without per-layer remat.

    PYTHONPATH=. python benchmarks/results/peft-cpu-memory/compile_bytes.py lora 0   # 1: remat

The temp growth from width 1 to 2 is what one more client adds to an unchunked round. (The
committed lora-compile-bytes.txt was made by this script with an HLO dump added for reading.)
"""

import sys
import time

import jax
import optax

from fedjax_lm import federated as fl
from fedjax_lm import models
from fedjax_lm.federated.engine import build_engine
from fedjax_lm.models.peft import trainable_predicate
from fedjax_lm.scale import memory as mem

variant, remat = sys.argv[1], sys.argv[2] == "1"
extra = dict(lora_rank=8, lora_targets=("query", "value")) if variant == "lora" else {}
model = models.Model(models.preset("mini", num_labels=2, remat=remat, **extra))
params = jax.eval_shape(model.init, jax.random.key(0))
pred = trainable_predicate("lora" if variant == "lora" else "none")
mask = None if pred is None else fl.mask_from_predicate(params, pred)
loss_fn = models.classification_loss(model)
batch = mem.text_batch(4, 8, 64)
for w in (1, 2):
    t = time.time()
    engine = build_engine(loss_fn, optax.adam(1e-4), None, clients_per_chunk=w,
                          chunk_executor="host", trainable=mask)
    m = engine.lower_chunk(params, batch.shapes(w)).compile().memory_analysis()
    mib = 2**20
    print(variant, "remat", remat, "w", w, "arg", m.argument_size_in_bytes / mib,
          "out", m.output_size_in_bytes / mib, "temp", m.temp_size_in_bytes / mib,
          "alias", m.alias_size_in_bytes / mib, f"{time.time() - t:.0f}s", flush=True)
