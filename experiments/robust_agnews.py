"""The robustness table (issue 17): aggregator x attack x malicious fraction x seed.

Run (from the repository root; resumes: finished cells in the CSV are skipped):

    nice -n 19 python experiments/robust_agnews.py --config experiments/robust_agnews.yaml \
        --data-dir ../shared/data --out experiments/results/robust_agnews

then `--plot-only` redraws the plot and the summary table from the CSV.

Every cell is one federated run on the engine: the aggregator is `fl.make_aggregator`, the
attack `fl.attacked` on it (or `fl.flip_labels` on the malicious clients' data), the malicious
clients `fl.malicious_clients` of the run seed, exactly as `fedjax-lm train` builds them. To
make 336 cells CPU-cheap the model is a linear softmax classifier on bag-of-token features
(the MiniLM tokenizer's ids hashed into `features` buckets, log1p, L2-normalised) of AG News;
one process runs every cell, so data and features are built once per seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from fedjax_lm import data as fdata
from fedjax_lm import federated as fl
from fedjax_lm import models

FIELDS = ["aggregator", "attack", "malicious_fraction", "seed", "accuracy", "train_loss",
          "status", "wall_s"]


def bag_of_tokens(input_ids, attention, buckets: int) -> jax.Array:
    """`[..., L]` token ids -> `[..., buckets]` log1p counts, L2-normalised (traceable: the
    clients' data stays token ids, the features are built inside the compiled round)."""
    ids = jnp.asarray(input_ids)
    flat = ids.reshape(-1, ids.shape[-1])
    rows = jnp.broadcast_to(jnp.arange(flat.shape[0])[:, None], flat.shape)
    counts = jnp.zeros((flat.shape[0], buckets), jnp.float32).at[rows, flat % buckets].add(
        jnp.asarray(attention, jnp.float32).reshape(flat.shape))
    x = jnp.log1p(counts.reshape(ids.shape[:-1] + (buckets,)))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def load(cfg: dict, data_dir: str, seed: int) -> dict:
    task = fdata.load_task("ag_news", data_dir, max_train=cfg["max_train_examples"],
                           max_test=cfg["max_test_examples"], seed=seed)
    tokenizer = fdata.load_tokenizer(models.minilm_path())
    splits = fdata.tokenize_task(task, tokenizer, cfg["max_length"])
    train, test = splits["train"].features, splits["test"].features
    partition = fdata.make_partitioner("iid")(task.train.labels, cfg["clients"], seed)
    return {"ids": train["input_ids"], "att": train["attention_mask"],
            "y": task.train.labels.astype(np.int32),
            "test_x": np.asarray(bag_of_tokens(test["input_ids"], test["attention_mask"],
                                               cfg["features"])),
            "test_y": task.test.labels.astype(np.int32),
            "partition": [np.asarray(ix) for ix in partition], "classes": task.num_classes}


def loss_fn(params, batch, rng):
    del rng
    x = bag_of_tokens(batch["ids"], batch["att"], params["w"].shape[0])
    logits = x @ params["w"] + params["b"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(losses * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0), {}


def round_data(cfg: dict, d: dict, seed: int, r: int, flip: np.ndarray | None) -> dict:
    """Every client's S x B examples of round r, drawn from its shard with (seed, r)."""
    rng = np.random.default_rng((seed, r))
    s, b = cfg["local_steps"], cfg["batch_size"]
    idx = np.stack([rng.choice(ix, (s, b)) for ix in d["partition"]])
    y = d["y"][idx]
    if flip is not None:  # label flipping: the malicious clients train on K - 1 - y
        y = np.where(flip[:, None, None], fl.flip_labels(y, d["classes"]), y)
    return {"ids": d["ids"][idx], "att": d["att"][idx], "y": y,
            "mask": np.ones(idx.shape, np.float32)}


def run_cell(cfg: dict, d: dict, aggregator: str, attack: str | None, fraction: float,
             seed: int) -> dict:
    t0 = time.perf_counter()
    n = cfg["clients"]
    malicious = fl.malicious_clients(n, fraction, seed)
    agg = fl.make_aggregator(fl.RobustConfig(
        aggregator, trim_fraction=cfg["trim_fraction"], norm_bound=cfg["norm_bound"],
        byzantine=cfg["byzantine"]))
    if attack not in (None, "label_flip"):
        agg = fl.attacked(agg, fl.AttackConfig(attack, scale=cfg["attack_scale"],
                                               std=cfg["attack_std"]), malicious)
    engine = fl.FederatedEngine(fl.fedavg(loss_fn, optax.sgd(cfg["lr"]), aggregator=agg),
                                fl.ExecutorConfig(backend="vmap"), weighting="uniform")
    dim = cfg["features"]
    params = {"w": jnp.zeros((dim, d["classes"])), "b": jnp.zeros((d["classes"],))}
    state = engine.init(params, jax.random.key(seed))
    flip = malicious if attack == "label_flip" else None
    for r in range(cfg["rounds"]):
        out = engine.run_round(state, round_data(cfg, d, seed, r, flip),
                               client_ids=np.arange(n))
        state = out.state
    w, b = np.asarray(state.params["w"]), np.asarray(state.params["b"])
    finite = bool(np.isfinite(w).all() and np.isfinite(b).all())
    acc = float(np.mean(np.argmax(d["test_x"] @ w + b, 1) == d["test_y"])) if finite else math.nan
    return {"aggregator": aggregator, "attack": attack or "none", "malicious_fraction": fraction,
            "seed": seed, "accuracy": acc, "train_loss": float(out.metrics.loss),
            "status": "ok" if finite else "diverged", "wall_s": time.perf_counter() - t0}


def cells(grid: dict) -> list[tuple]:
    """Fraction 0 is the clean run (no attack), once per aggregator and seed."""
    out = []
    for seed in grid["seed"]:
        for aggregator in grid["aggregator"]:
            out.append((aggregator, None, 0.0, seed))
            for attack in grid["attack"]:
                for fraction in grid["malicious_fraction"]:
                    if fraction > 0:
                        out.append((aggregator, attack, fraction, seed))
    return out


def done_cells(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    with path.open() as f:
        return {(r["aggregator"], None if r["attack"] == "none" else r["attack"],
                 float(r["malicious_fraction"]), int(r["seed"])) for r in csv.DictReader(f)}


def run_all(cfg: dict, grid: dict, data_dir: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.csv"
    done = done_cells(table)
    todo = [c for c in cells(grid) if c not in done]
    print(f"{len(todo)} of {len(cells(grid))} cells to run", flush=True)
    new = not table.exists()
    data: dict[int, dict] = {}
    with table.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for i, (aggregator, attack, fraction, seed) in enumerate(todo):
            if seed not in data:
                data[seed] = load(cfg, data_dir, seed)
            row = run_cell(cfg, data[seed], aggregator, attack, fraction, seed)
            writer.writerow(row)
            f.flush()
            print(f"[{i + 1}/{len(todo)}] {aggregator} {row['attack']} {fraction} seed {seed}: "
                  f"acc {row['accuracy']:.4f} ({row['wall_s']:.1f}s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    preset = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    if not args.plot_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(preset, indent=1))
        run_all(preset["settings"], preset["grid"], args.data_dir, out)
    from robust_agnews_report import report  # beside this script

    report(out, preset["grid"])


if __name__ == "__main__":
    main()
