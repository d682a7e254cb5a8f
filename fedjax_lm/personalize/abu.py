"""Paper 3's experiments (Sütfeld et al.): Adaptive Blending Units against fixed and α-scaled
activations in the "smcn" CNN on CIFAR-10, and ABU inside an encoder's FFN under FedAvg.

    python -m fedjax_lm.personalize.abu --config experiments/abu_cifar10.yaml --out DIR
    python -m fedjax_lm.personalize.abu --config experiments/abu_federated.yaml --out DIR

CIFAR: the seeds of one activation train together over a leading run axis (vmapped, the same
trick as clients, or mapped one after another inside the step: `seed_axis`), on per-image
standardised images with Adam; validation accuracy (5% split) is checked every `eval_every`
steps, each run keeps its best-validation params with `where`, and those are tested.
Federated: `fedjax_lm.runner.train` with `hidden_act` set per arm; the blend weights are
averaged by FedAvg like every other parameter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lm import data as fdata
from fedjax_lm.grid import ConfigError, append_cell, execution_field, load_yaml, resume_grid
from fedjax_lm.io import atomic_savefig, atomic_write_bytes
from fedjax_lm.models.activations import ABU_BASES, ABU_VARIANTS, blend_weights
from fedjax_lm.models.activations import ACTIVATIONS as MODEL_ACTIVATIONS
from fedjax_lm.models.cnn import (
    INITS,
    image_classification_eval,
    image_classification_loss,
    make_cnn_model,
)
from fedjax_lm.personalize import report
from fedjax_lm.personalize.clients import select_clients
from fedjax_lm.personalize.config import (
    check_choice,
    check_int,
    check_list,
    check_number,
    check_seeds,
    check_str,
    load_config,
    need,
)

Params = Any
ACTIVATIONS = (*ABU_VARIANTS, "relu", "elu", "selu", "tanh", "swish", "identity",
               "scaled_relu", "scaled_elu", "scaled_selu", "scaled_tanh", "scaled_swish",
               "scaled_identity")


@dataclass(frozen=True)
class AbuCifarConfig:
    """smcn on CIFAR-10; the paper's budget is 60k minibatches of 256 and 30 runs."""

    name: str = execution_field("abu_cifar10")
    kind: str = "cifar"
    activations: tuple[str, ...] = ACTIVATIONS
    seeds: tuple[int, ...] = (0, 1, 2)
    width: int = 64  # smcn conv channels (64 = the paper); fc widths scale with it
    # paper: the authors' truncated-normal kernels, biases 0.1 (the presets set it); flax: the
    # library defaults, what runs made before this field existed used (absent = flax).
    init: str = "flax"
    steps: int = 60_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0  # never applied to blend weights / β / α
    dropout_rate: float = 0.5
    val_fraction: float = 0.05
    eval_every: int = 500
    max_train: int | None = None  # a seeded subset of the 95% training split
    max_test: int | None = None
    eval_batch_size: int = 500
    data_dir: str | None = execution_field(None)
    # How the seeds' training steps are batched: "vmap" (one batched step, what the 10-seed
    # study ran) or "map" (`lax.map`: one seed after another inside the compiled step, 1.4-1.5x
    # faster on 2 CPU cores, benchmarks/conv_in_loops.py). The same function up to float
    # rounding; a partial checkpoint continues only under the axis it was made with.
    seed_axis: str = execution_field("vmap")


SEED_AXES = ("vmap", "map")
KINDS = ("cifar", "federated")


@dataclass(frozen=True)
class AbuFederatedConfig:
    """`runner.train` for each arm (name → hidden_act, None = the model's own GELU) × seed."""

    name: str = execution_field("abu_federated")
    kind: str = "federated"
    arms: dict[str, str | None] = field(default_factory=lambda: {"gelu": None, "abu_n": "abu_n"})
    seeds: tuple[int, ...] = (0, 1, 2)
    run: dict[str, Any] = field(default_factory=dict)  # RunConfig fields shared by all arms
    # Run dirs (checkpoints) stay out of git.
    work_dir: str = execution_field("/tmp/fedjax_lm_abu_federated")
    data_dir: str | None = execution_field(None)


# ----------------------------------------------------------------------------- model


def smcn_model(activation: str, width: int, dropout_rate: float, num_classes: int = 10,
               init: str = "flax"):
    """Paper 3's smcn (`cnn.SMCN`); width 64 is the paper's, narrower copies fit a CPU."""
    return make_cnn_model("smcn", num_classes, activation, dropout_rate=dropout_rate,
                          width=width, init=init)


def standardize(images: np.ndarray) -> np.ndarray:
    """Per-image standardisation (tf.image.per_image_standardization): zero mean, unit std,
    std floored at 1/sqrt(#pixels) so flat images do not blow up."""
    x = images.astype(np.float32) / 255.0
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = np.maximum(x.std(axis=(1, 2, 3), keepdims=True), 1.0 / np.sqrt(x[0].size))
    return (x - mean) / std


def is_blend_param(path: tuple[Any, ...]) -> bool:
    """ABU weights, Swish β and scaling α: the trainable activation parameters."""
    last = str(getattr(path[-1], "key", path[-1]))
    return last in {f"{v}_w" for v in ABU_VARIANTS} | {"beta", "alpha"}


def make_optimizer(lr: float, weight_decay: float) -> optax.GradientTransformation:
    """Adam; with weight decay, decoupled decay on every parameter except the blend weights."""
    if not weight_decay:
        return optax.adam(lr)
    mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, _: not is_blend_param(p), params)
    return optax.adamw(lr, weight_decay=weight_decay, mask=mask)


# ----------------------------------------------------------------------------- cifar


def load_cifar(cfg: AbuCifarConfig) -> dict[str, dict[str, np.ndarray]]:
    """Standardised train / val (seeded 5% split of the train set) / test arrays."""
    task = fdata.load_task("cifar10", cfg.data_dir)
    n = len(task.train)
    perm = np.random.default_rng(1234).permutation(n)
    n_val = int(round(cfg.val_fraction * n))
    need(1 <= n_val < n, f"val_fraction {cfg.val_fraction} of the {n} training images leaves "
                         f"{n_val} for validation and {n - n_val} for training; choose a "
                         "val_fraction that leaves both at least one")
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    need(cfg.max_train is None or cfg.max_train <= len(train_idx),
         f"max_train must be at most {len(train_idx)} (the training split), got "
         f"{cfg.max_train}; lower max_train or unset it")
    need(cfg.max_test is None or cfg.max_test <= len(task.test),
         f"max_test must be at most {len(task.test)} (the test set), got {cfg.max_test}; "
         "lower max_test or unset it")
    if cfg.max_train is not None:
        train_idx = np.sort(np.random.default_rng(1).choice(train_idx, cfg.max_train, False))
    test_idx = np.arange(len(task.test))
    if cfg.max_test is not None:
        test_idx = np.sort(np.random.default_rng(2).choice(test_idx, cfg.max_test, False))

    def part(split, idx):
        return {"image": standardize(split.images[idx]), "label": split.labels[idx]}

    return {"train": part(task.train, train_idx), "val": part(task.train, val_idx),
            "test": part(task.test, test_idx)}


def _eval_batches(split: dict[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
    b = fdata.pack_eval(split, batch_size)
    return {k: jnp.asarray(v) for k, v in b.items()}


def _partial_key(cfg: AbuCifarConfig, activation: str) -> dict[str, Any]:
    """What a saved partial run must match to be continued (everything but where it runs)."""
    values = dataclasses.asdict(cfg)
    for name in ("name", "data_dir", "activations"):
        values.pop(name)
    return {"activation": activation, **values}


def save_partial(path: Path, cfg: AbuCifarConfig, activation: str, state: dict[str, Any]
                 ) -> None:
    """Pickle one activation's training state (host arrays) atomically, so a killed run
    continues from its last validation check instead of from step 0."""
    payload = {"key": _partial_key(cfg, activation), **jax.device_get(state)}
    atomic_write_bytes(path, pickle.dumps(payload))


def load_partial(path: Path | None, cfg: AbuCifarConfig, activation: str
                 ) -> dict[str, Any] | None:
    """The saved state of this activation under this config, or None (none saved, or saved
    under other settings: then it is ignored and overwritten)."""
    if path is None or not path.is_file():
        return None
    payload = pickle.loads(path.read_bytes())
    if payload.pop("key") != _partial_key(cfg, activation):
        return None
    for name in ("params", "opt_state", "best"):
        payload[name] = jax.tree.map(jnp.asarray, payload[name])
    return payload


def train_activation(
    cfg: AbuCifarConfig, activation: str, arrays: dict[str, dict[str, np.ndarray]],
    log: Callable[[str], None] = print, checkpoint: Path | None = None,
) -> dict[str, Any]:
    """All seeds of one activation over a leading run axis (`cfg.seed_axis`). With `checkpoint`, the
    state is saved there after every validation check and a matching saved state is resumed
    (bitwise the same run: data order, dropout keys and Adam state all continue)."""
    t0 = time.perf_counter()
    model = smcn_model(activation, cfg.width, cfg.dropout_rate, init=cfg.init)
    loss_fn, eval_fn = image_classification_loss(model), image_classification_eval(model)
    opt = make_optimizer(cfg.lr, cfg.weight_decay)
    r = len(cfg.seeds)
    params = jax.jit(jax.vmap(model.init))(jnp.stack([jax.random.key(s) for s in cfg.seeds]))
    opt_state = jax.vmap(opt.init)(params)
    train_x = jnp.asarray(arrays["train"]["image"])
    train_y = jnp.asarray(arrays["train"]["label"])
    val_b = _eval_batches(arrays["val"], cfg.eval_batch_size)
    test_b = _eval_batches(arrays["test"], cfg.eval_batch_size)

    def one_step(p, o, idx, key):
        batch = {"image": train_x[idx], "label": train_y[idx],
                 "mask": jnp.ones(idx.shape, jnp.float32)}
        (_, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, key)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    if cfg.seed_axis == "vmap":
        vstep = jax.vmap(one_step)
    else:
        vstep = lambda *args: jax.lax.map(lambda a: one_step(*a), args)

    @jax.jit
    def chunk(p, o, idx, keys):  # idx [K, R, B], keys [K, R]
        def body(carry, inp):
            return vstep(*carry, *inp), None

        (p, o), _ = jax.lax.scan(body, (p, o), (idx, keys))
        return p, o

    @jax.jit
    def accuracy(p, batches):
        def body(acc, batch):
            out = jax.vmap(eval_fn, in_axes=(0, None))(p, batch)
            return (acc[0] + out["correct"], acc[1] + out["count"]), None

        zero = jnp.zeros((r,), jnp.float32)
        (correct, count), _ = jax.lax.scan(body, (zero, zero), batches)
        return correct / count

    n = len(train_y)
    rngs = [np.random.default_rng((s, 99)) for s in cfg.seeds]
    orders = [np.empty(0, np.int64) for _ in cfg.seeds]

    def next_indices(k: int) -> np.ndarray:
        """[k, R, B] minibatch indices: per-run reshuffled epochs, no replacement in an epoch."""
        out = np.empty((k, r, cfg.batch_size), np.int32)
        for j in range(r):
            need = k * cfg.batch_size
            while len(orders[j]) < need:
                orders[j] = np.concatenate([orders[j], rngs[j].permutation(n)])
            out[:, j] = orders[j][:need].reshape(k, cfg.batch_size)
            orders[j] = orders[j][need:]
        return out

    best = params
    best_val = jnp.full((r,), -1.0)
    best_step = np.zeros(r, np.int64)
    curve: list[dict[str, Any]] = []
    base = jax.random.key(12345)
    done, wall_before = 0, 0.0
    saved = load_partial(checkpoint, cfg, activation)
    if saved is not None:
        done, curve, wall_before = saved["done"], saved["curve"], saved["wall_s"]
        params, opt_state, best = saved["params"], saved["opt_state"], saved["best"]
        best_val, best_step = jnp.asarray(saved["best_val"]), np.asarray(saved["best_step"])
        orders = saved["orders"]
        for g, state in zip(rngs, saved["rng_states"], strict=True):
            g.bit_generator.state = state
        log(f"  {activation}: resumed at step {done} of {cfg.steps}")
    while done < cfg.steps:
        k = min(cfg.eval_every, cfg.steps - done)
        keys = jax.vmap(lambda i: jax.vmap(lambda s: jax.random.fold_in(
            jax.random.fold_in(base, s), i))(jnp.asarray(cfg.seeds)))(done + jnp.arange(k))
        params, opt_state = chunk(params, opt_state, jnp.asarray(next_indices(k)), keys)
        done += k
        val = accuracy(params, val_b)
        improved = val > best_val
        best = select_clients(improved, params, best)
        best_val = jnp.where(improved, val, best_val)
        best_step = np.where(np.asarray(improved), done, best_step)
        curve.append({"step": done, "val_acc": np.asarray(val).tolist()})
        log(f"  {activation}: step {done} of {cfg.steps}, validation accuracy "
            f"{', '.join(f'{100 * v:.1f}' for v in curve[-1]['val_acc'])} % "
            f"({wall_before + time.perf_counter() - t0:.0f}s)")
        if checkpoint is not None and done < cfg.steps:
            save_partial(checkpoint, cfg, activation, {
                "done": done, "curve": curve, "params": params, "opt_state": opt_state,
                "best": best, "best_val": best_val, "best_step": best_step, "orders": orders,
                "rng_states": [g.bit_generator.state for g in rngs],
                "wall_s": wall_before + time.perf_counter() - t0})
    test = np.asarray(accuracy(best, test_b))
    rec: dict[str, Any] = {
        "activation": activation, "seeds": list(cfg.seeds), "test_acc": test.tolist(),
        "best_val_acc": np.asarray(best_val).tolist(), "best_step": best_step.tolist(),
        "curve": curve, "wall_s": wall_before + time.perf_counter() - t0,
    }
    weights = blend_weights(best)
    if weights:
        rec["blend_weights"] = {layer: w.tolist() for layer, w in weights.items()}
    spread = f" ± {100 * test.std(ddof=1):.1f}" if len(test) > 1 else " (one seed)"
    log(f"  {activation:16s} test {100 * test.mean():.1f}{spread} "
        f"(best step {best_step.tolist()}, {rec['wall_s']:.0f}s)")
    return rec


def run_cifar(cfg: AbuCifarConfig, out_dir: Path, command: str) -> list[dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _logger(out_dir)
    t0 = time.perf_counter()
    done, todo = resume_grid(out_dir, cfg, {"activation": "activations"})
    arrays = load_cifar(cfg)
    log(f"{cfg.name}: train {len(arrays['train']['label'])}, val {len(arrays['val']['label'])},"
        f" test {len(arrays['test']['label'])}; width {cfg.width}, {cfg.steps} steps of "
        f"{cfg.batch_size}")
    for cell in todo:
        ckpt = out_dir / "checkpoints" / f"{cell['activation']}.pkl"  # git-ignored
        rec = train_activation(cfg, cell["activation"], arrays, log, checkpoint=ckpt)
        done.append(rec)
        append_cell(out_dir, rec)
        ckpt.unlink(missing_ok=True)
        write_cifar_report(out_dir, done, cfg, command, time.perf_counter() - t0)
    return done


REFERENCE = "relu"  # the paired differences in the table are against this activation


def _paired(rec: dict[str, Any], ref: dict[str, Any] | None) -> tuple[str, str]:
    """(Δ test accuracy vs the reference, mean ± std over the shared seeds; wins / n).

    Seed s gives every activation the same initial kernels, data order and dropout keys, so the
    per-seed difference is a paired comparison."""
    if ref is None or rec is ref:
        return "–", "–"
    mine = dict(zip(rec["seeds"], rec["test_acc"], strict=True))
    theirs = dict(zip(ref["seeds"], ref["test_acc"], strict=True))
    shared = [s for s in mine if s in theirs]
    if not shared:
        return "–", "–"
    d = np.asarray([mine[s] - theirs[s] for s in shared])
    wins = int((d > 0).sum())
    return f"{report.mean_std(d)}", f"{wins}/{len(d)}"


def _paired_matrix(ranked: list[dict[str, Any]]) -> list[str]:
    """Every pair's paired difference, row − column, so that "A above B" reads off the table
    for any A and B, not only against the reference; empty with fewer than 3 activations."""
    if len(ranked) < 3:
        return []
    names = [r["activation"] for r in ranked]
    lines = ["", "Paired differences, row − column (test accuracy, pp: mean ± std over the shared "
             "seeds; seeds where the row is higher):", "",
             "| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for rec in ranked:
        cells = []
        for other in ranked:
            delta, wins = _paired(rec, other)
            cells.append("–" if other is rec else f"{delta} ({wins})")
        lines.append(f"| {rec['activation']} | " + " | ".join(cells) + " |")
    return lines


def write_cifar_report(out_dir: Path, recs: list[dict[str, Any]], cfg: Any, command: str,
                       wall_s: float) -> None:
    rows = []
    for rec in recs:
        for seed, acc, val, step in zip(rec["seeds"], rec["test_acc"], rec["best_val_acc"],
                                        rec["best_step"], strict=True):
            rows.append({"activation": rec["activation"], "seed": seed,
                         "test_acc": round(acc, 4), "best_val_acc": round(val, 4),
                         "best_step": step})
    ranked = sorted(recs, key=lambda r: -float(np.mean(r["test_acc"])))
    ref = next((r for r in recs if r["activation"] == REFERENCE), None)
    lines = [f"| activation | test accuracy (%) mean ± std | n | Δ vs {REFERENCE} (paired, pp) "
             f"| seeds above {REFERENCE} | best val (%) | runs whose best step is the last |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rec in ranked:
        delta, wins = _paired(rec, ref)
        last = int(np.sum(np.asarray(rec["best_step"]) == cfg.steps))
        lines.append(f"| {rec['activation']} | {report.mean_std(rec['test_acc'])} | "
                     f"{len(rec['test_acc'])} | {delta} | {wins} | "
                     f"{100 * np.mean(rec['best_val_acc']):.1f} | {last}/{len(rec['best_step'])} |")
    lines += _paired_matrix(ranked)
    _plot_accuracy(out_dir / "accuracy.png", ranked, cfg)
    _plot_curves(out_dir / "val_curves.png", recs)
    _plot_blend(out_dir / "blend_weights.png", [r for r in recs if "blend_weights" in r])
    report.write_results(out_dir, rows, "\n".join(lines) + "\n", cfg, command, wall_s, recs,
                         activations_done=len(recs))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy(path: Path, ranked: list[dict[str, Any]], cfg: Any) -> None:
    """Test accuracy per activation, best first: mean ± std over seeds (bar) and every seed
    (dots), ABU variants / α-scaled / fixed in three colours."""
    if not ranked:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.32 * len(ranked) + 1.2))
    for i, rec in enumerate(ranked):
        a = 100 * np.asarray(rec["test_acc"])
        name = rec["activation"]
        color = "C2" if name in ABU_VARIANTS else ("C1" if name.startswith("scaled_") else "C0")
        y = len(ranked) - 1 - i
        ax.scatter(a, np.full(len(a), y), s=8, color=color, alpha=0.35)
        ax.errorbar(a.mean(), y, xerr=a.std(ddof=1) if len(a) > 1 else 0, fmt="o",
                    color=color, capsize=3)
    ax.set_yticks(range(len(ranked)), [r["activation"] for r in ranked][::-1])
    ax.set_xlabel(f"test accuracy (%), mean ± std over {len(ranked[0]['test_acc'])} seeds "
                  "(dots: seeds)")
    ax.set_title(f"smcn width {cfg.width}, {cfg.steps} steps of {cfg.batch_size}: "
                 "ABU (green), α-scaled (orange), fixed (blue)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)


def _plot_curves(path: Path, recs: list[dict[str, Any]]) -> None:
    """Small multiples: validation accuracy vs step per activation, mean ± std over seeds,
    on shared axes (the reference activation in grey in every panel)."""
    if not recs:
        return
    plt = _plt()
    n = len(recs)
    cols = min(n, 6)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.9 * rows), sharex=True,
                             sharey=True, squeeze=False)
    ref = next((r for r in recs if r["activation"] == REFERENCE), None)

    def curve(rec):
        steps = [c["step"] for c in rec["curve"]]
        v = 100 * np.asarray([c["val_acc"] for c in rec["curve"]])  # [T, seeds]
        return steps, v.mean(1), v.std(1, ddof=1) if v.shape[1] > 1 else 0 * v.mean(1)

    for ax, rec in zip(axes.flat, recs, strict=False):
        if ref is not None and rec is not ref:
            x, mu, sd = curve(ref)
            ax.plot(x, mu, color="0.6", lw=1)
        x, mu, sd = curve(rec)
        ax.errorbar(x, mu, yerr=sd, color="C0", capsize=2, lw=1.2)
        ax.set_title(rec["activation"], fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("val acc (%)", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(f"validation accuracy, mean ± std over seeds (grey: {REFERENCE})", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path)


def activation_colours(names: Any = ()) -> dict[str, str]:
    """One fixed colour per activation in every panel and plot: the ABU bases first (tab10's
    first five), then `names` not among them in tab10's remaining colours (grey last)."""
    colours = {base: f"C{i}" for i, base in enumerate(ABU_BASES)}
    rest = iter(["C5", "C6", "C8", "C9", "C7"])
    for name in names:
        if name not in colours:
            colours[name] = next(rest, "k")
    return colours


def _blend_bars(ax: Any, layers: list[str], per_seed: np.ndarray) -> None:
    """Per layer, one bar per ABU base: mean over seeds (axis 1 of `per_seed` [L, seeds, 5]),
    ± std where there are seeds, in the bases' fixed colours; dotted: the uniform init."""
    colours = activation_colours()
    w = per_seed.mean(1)
    sd = per_seed.std(1, ddof=1) if per_seed.shape[1] > 1 else None
    x = np.arange(len(layers))
    for j, base in enumerate(ABU_BASES):
        ax.bar(x + (j - 2) * 0.16, w[:, j], width=0.16, label=base, color=colours[base],
               yerr=None if sd is None else sd[:, j], capsize=1.5, error_kw={"lw": 0.7})
    ax.axhline(1 / len(ABU_BASES), color="k", lw=0.5, ls=":")


def _plot_blend(path: Path, recs: list[dict[str, Any]]) -> None:
    """One panel per ABU variant: effective blend weight of each base per layer, mean ± std
    over seeds — what each layer's activation moved to from its uniform 0.2. The bases' legend
    sits above the panels, off the bars."""
    if not recs:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, len(recs), figsize=(3.6 * len(recs), 3.6), squeeze=False,
                             sharey=True)
    for ax, rec in zip(axes[0], recs, strict=True):
        layers = sorted(rec["blend_weights"], key=lambda s: (len(s), s))
        per_seed = np.stack([np.asarray(rec["blend_weights"][name]).reshape(-1, len(ABU_BASES))
                             for name in layers])  # [L, seeds, 5]
        _blend_bars(ax, layers, per_seed)
        ax.set_xticks(np.arange(len(layers)), layers, rotation=45)
        ax.set_title(rec["activation"])
    axes[0][0].set_ylabel("effective blend weight")
    n = len(recs[0]["seeds"])
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center",
               ncol=len(ABU_BASES), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.93))
    fig.suptitle(f"ABU blend weights per layer: mean ± std over {n} seeds; dotted: uniform "
                 "init 0.2", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    atomic_savefig(fig, path)


# ----------------------------------------------------------------------------- federated


def run_values(cfg: AbuFederatedConfig, arm: str, seed: int) -> dict[str, Any]:
    """The `runner.train` config values of one (arm, seed)."""
    run_dir = Path(cfg.work_dir) / cfg.name / f"{arm}-seed{seed}"
    values = {**cfg.run, "hidden_act": cfg.arms[arm], "seed": seed, "out": str(run_dir)}
    values["checkpoint_every"] = values.get("rounds", 3)
    if cfg.data_dir:
        values["data_dir"] = cfg.data_dir
    return values


def run_federated(cfg: AbuFederatedConfig, out_dir: Path, command: str) -> list[dict[str, Any]]:
    """`runner.train` per (arm, seed); the final global model's blend weights are restored from
    the run's last checkpoint."""
    from fedjax_lm.runner import from_dict, train
    from fedjax_lm.runner.checkpoint import Checkpointer
    from fedjax_lm.runner.experiment import build_engine, build_experiment

    out_dir.mkdir(parents=True, exist_ok=True)
    log = _logger(out_dir)
    t0 = time.perf_counter()
    done, todo = resume_grid(out_dir, cfg, {"arm": "arms", "seed": "seeds"})
    for cell in todo:
        arm, seed = cell["arm"], cell["seed"]
        act = cfg.arms[arm]
        run_dir = Path(cfg.work_dir) / cfg.name / f"{arm}-seed{seed}"
        run_cfg = from_dict(run_values(cfg, arm, seed))
        t1 = time.perf_counter()
        exp = build_experiment(run_cfg)
        final = train(run_cfg, progress=False, exp=exp)
        rec = {"arm": arm, "hidden_act": act, "seed": seed,
               "final_accuracy": final["final_accuracy"],
               "best_accuracy": final["best_accuracy"],
               "final_eval_loss": final["final_eval_loss"],
               "final_train_loss": final["final_train_loss"],
               "curve": [json.loads(x) for x in
                         (run_dir / "metrics.jsonl").read_text().splitlines()],
               "wall_s": time.perf_counter() - t1}
        if act and act in ABU_VARIANTS:
            template = build_engine(run_cfg, exp).init(exp.params, jax.random.key(seed))
            ckpt = Checkpointer(run_dir / "checkpoints")
            _, state, _ = ckpt.restore(template)
            ckpt.close()
            rec["blend_weights"] = {k: v.tolist() for k, v in
                                    blend_weights(state.params).items()}
        log(f"  {arm:8s} seed {seed}: final acc {rec['final_accuracy']:.3f} "
            f"({rec['wall_s']:.0f}s)")
        done.append(rec)
        append_cell(out_dir, rec)
        write_federated_report(out_dir, done, cfg, command, time.perf_counter() - t0)
    return done


def write_federated_report(out_dir: Path, recs: list[dict[str, Any]], cfg: Any, command: str,
                           wall_s: float) -> None:
    rows = [{"arm": r["arm"], "hidden_act": r["hidden_act"] or "model default (gelu)",
             "seed": r["seed"], "final_accuracy": round(r["final_accuracy"], 4),
             "best_accuracy": round(r["best_accuracy"], 4),
             "final_eval_loss": round(r["final_eval_loss"], 4)} for r in recs]
    lines = ["| FFN activation | final test accuracy (%) | best-round accuracy (%) | "
             "final test loss | n |", "| --- | --- | --- | --- | --- |"]
    for arm in dict.fromkeys(r["arm"] for r in recs):
        rs = [r for r in recs if r["arm"] == arm]
        loss = np.asarray([r["final_eval_loss"] for r in rs])
        lines.append(f"| {arm} | {report.mean_std([r['final_accuracy'] for r in rs])} | "
                     f"{report.mean_std([r['best_accuracy'] for r in rs])} | "
                     f"{loss.mean():.3f} | {len(rs)} |")
    _plot_federated(out_dir / "plot.png", recs)
    report.write_results(out_dir, rows, "\n".join(lines) + "\n", cfg, command, wall_s, recs,
                         runs_done=len(recs))


def _plot_federated(path: Path, recs: list[dict[str, Any]]) -> None:
    """Accuracy vs round per arm (mean ± std over seeds, one panel per arm on shared axes, the
    other arms' means thin) and, for ABU arms, the FedAvg-averaged blend weights per layer
    (mean ± std over seeds). Every activation, arm or ABU base, keeps one colour throughout;
    one legend above the panels."""
    plt = _plt()
    arms = list(dict.fromkeys(r["arm"] for r in recs))
    colours = activation_colours(arms)
    abu_recs = [r for r in recs if "blend_weights" in r]
    n = len(arms) + bool(abu_recs)
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 3.6), squeeze=False)
    axes = axes[0]

    def curves(arm):
        rs = [r for r in recs if r["arm"] == arm]
        pts = [[(c["round"], c["eval_accuracy"]) for c in r["curve"] if "eval_accuracy" in c]
               for r in rs]
        m = min(len(c) for c in pts)
        return [c[0] for c in pts[0][:m]], 100 * np.asarray([[v for _, v in c[:m]] for c in pts])

    handles, labels = [], []
    for i, arm in enumerate(arms):
        ax = axes[i]
        x, a = curves(arm)
        for other in arms:  # the other arms thin, in their own colours, for comparison
            if other != arm:
                ox, oa = curves(other)
                ax.plot(ox, oa.mean(0), color=colours[other], lw=1, alpha=0.6)
        sd = a.std(0, ddof=1) if len(a) > 1 else np.zeros(len(x))
        h = ax.errorbar(x, a.mean(0), yerr=sd, marker="o", ms=3, capsize=3, lw=1.8,
                        color=colours[arm])
        handles.append(h)
        labels.append(f"{arm} (n={len(a)})")
        ax.set_title(f"{arm}\n(thin: the other arms' means)", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("global test accuracy (%)\nmean ± std over seeds")
    for ax in axes[1:len(arms)]:
        ax.sharey(axes[0])
    if abu_recs:
        ax = axes[-1]
        layers = sorted(abu_recs[0]["blend_weights"], key=lambda s: (len(s), s))
        per_seed = np.stack([np.stack([np.asarray(r["blend_weights"][name]).reshape(-1)
                                       for r in abu_recs]) for name in layers])  # [L, seeds, 5]
        _blend_bars(ax, layers, per_seed)
        ax.set_xticks(np.arange(len(layers)), [name.replace("/", "\n") for name in layers],
                      fontsize=6)
        abu_arms = ", ".join(dict.fromkeys(r["arm"] for r in abu_recs))
        ax.set_title(f"{abu_arms} blend weights per FFN layer\n(mean ± std over seeds; "
                     "dotted: init)", fontsize=8)
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += [f"{b} (ABU base)" for b in lab]
    fig.legend(handles, labels, loc="upper center", ncol=len(handles), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    atomic_savefig(fig, path)


# ----------------------------------------------------------------------------- driver


def _logger(out_dir: Path) -> Callable[[str], None]:
    path = out_dir / "progress.log"

    def log(msg: str) -> None:
        print(msg, flush=True)
        with path.open("a") as f:
            f.write(msg + "\n")

    return log


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiments/abu_*.yaml")
    parser.add_argument("--out", default=None, help="output dir (default experiments/results/NAME)")
    parser.add_argument("--data-dir", default=None, help="dataset root (else $FEDJAX_LM_DATA_DIR)")
    parser.add_argument("--smoke", action="store_true", help="the config's few-step smoke run")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite table, CSV and plots from the finished cells; no training")
    parser.add_argument("--work-dir", default=None,
                        help="federated configs: where the per-run checkpoint dirs go "
                             "(default: the config's work_dir)")


def check_config(cfg: AbuCifarConfig | AbuFederatedConfig) -> None:
    """Reject settings that would otherwise fail (or silently mean something else) mid-run:
    every field a user sets, before any data is loaded or any model trained."""
    check_str("name", cfg.name)
    check_str("data_dir", cfg.data_dir, optional=True)
    if isinstance(cfg, AbuFederatedConfig):
        _check_federated(cfg)
        return
    check_list("activations", cfg.activations, "activation names")
    for act in cfg.activations:
        need(act in MODEL_ACTIVATIONS, f"unknown activation {act!r} in activations; valid: "
                                       f"{', '.join(MODEL_ACTIVATIONS)}")
    check_seeds("seeds", cfg.seeds)
    check_int("width", cfg.width)
    if cfg.init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(INITS)}, got {cfg.init!r}")
    check_int("steps", cfg.steps)
    check_int("batch_size", cfg.batch_size)
    check_number("lr", cfg.lr, 0.0, low_open=True)
    check_number("weight_decay", cfg.weight_decay, 0.0)
    check_number("dropout_rate", cfg.dropout_rate, 0.0, 1.0)
    check_number("val_fraction", cfg.val_fraction, 0.0, 1.0, low_open=True)
    check_int("eval_every", cfg.eval_every)
    check_int("max_train", cfg.max_train, optional=True)
    check_int("max_test", cfg.max_test, optional=True)
    check_int("eval_batch_size", cfg.eval_batch_size)
    if cfg.seed_axis not in SEED_AXES:
        raise ConfigError(f"seed_axis must be one of {', '.join(SEED_AXES)}, "
                          f"got {cfg.seed_axis!r}")


def _check_federated(cfg: AbuFederatedConfig) -> None:
    """Every arm's activation, then each (arm, seed)'s whole `runner.train` config by the
    runner's own rules, so that no arm trains before a later one is refused."""
    from fedjax_lm.models.hidden_act import hidden_act_names
    from fedjax_lm.runner import from_dict
    from fedjax_lm.runner.checks import SEED_MAX as RUN_SEED_MAX

    need(isinstance(cfg.arms, dict) and len(cfg.arms) > 0,
         f"arms must be a non-empty mapping of arm name to activation (null: the model's own), "
         f"got {cfg.arms!r}")
    for arm, act in cfg.arms.items():
        check_str("an arm's name", arm)
        need(act is None or (isinstance(act, str) and act in hidden_act_names()),
             f"arms.{arm}: unknown activation {act!r}; valid: null (the model's own), "
             f"{', '.join(hidden_act_names())}")
    check_seeds("seeds", cfg.seeds, RUN_SEED_MAX)
    need(isinstance(cfg.run, dict), f"run must be a mapping of run settings, got {cfg.run!r}")
    check_str("work_dir", cfg.work_dir)
    for arm in cfg.arms:
        for seed in cfg.seeds:
            try:
                from_dict(run_values(cfg, arm, seed))
            except ConfigError as e:
                raise ConfigError(f"run (arm {arm}, seed {seed}): {e}") from None


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    kind = load_yaml(args.config).get("kind", "cifar")
    check_choice("kind", kind, KINDS)
    cls = AbuCifarConfig if kind == "cifar" else AbuFederatedConfig
    cfg: Any = load_config(cls, args.config, smoke=args.smoke)
    need(cfg.kind == kind, f"smoke: kind {cfg.kind!r} differs from the config's kind {kind!r}; "
                           "remove kind from the smoke block")
    check_config(cfg)
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
    if args.work_dir:
        if kind == "cifar":
            raise ConfigError("--work-dir applies to federated ABU configs only")
        cfg = dataclasses.replace(cfg, work_dir=args.work_dir)
    out = Path(args.out or f"experiments/results/{cfg.name}")
    command = " ".join(["python -m fedjax_lm.personalize.abu", *(argv or sys.argv[1:])])
    if args.report_only:
        axes = {"activation": "activations"} if kind == "cifar" else {"arm": "arms",
                                                                        "seed": "seeds"}
        done, _ = resume_grid(out, cfg, axes)
        command, wall_s = report.finished_run(out, done)
        write = write_cifar_report if kind == "cifar" else write_federated_report
        write(out, done, cfg, command, wall_s)
        return 0
    (run_cifar if kind == "cifar" else run_federated)(cfg, out, command)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fedjax_lm.personalize.abu`, the same command as `fedjax-lm abu`: bad input
    is one line and exit status 2 (fedjax_lm.entry)."""
    from fedjax_lm.entry import module_main

    return module_main("python -m fedjax_lm.personalize.abu", __doc__.splitlines()[0],
                       add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
