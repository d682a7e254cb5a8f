"""Per-client training for every client at once: params carry a leading client axis [C, ...].

Local-only models, fine-tuning of the global model and the mixture all train the same way:
one jitted epoch = `lax.scan` over local steps of a `vmap` over clients. A frozen pytree (the
global model for the mixture) is broadcast to every client, never optimised. Early stopping on
each client's own validation loss is vectorised: a client whose validation loss stopped
improving for `patience` epochs is frozen with `where` (no Python control flow per client) and
the best params per client are kept with `where` as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lm.personalize.mixture import PersonalEval, PersonalLoss

Params = Any
Batch = dict[str, Any]


def select_clients(pred: jax.Array, on_true: Params, on_false: Params) -> Params:
    """Per-client `where`: pred [C] picks whole client slices of stacked pytrees [C, ...]."""

    def pick(a, b):
        return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, on_true, on_false)


def broadcast_clients(params: Params, num_clients: int) -> Params:
    """One params pytree repeated on a new leading client axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), params)


def make_epoch_fn(loss_fn: PersonalLoss, optimizer: optax.GradientTransformation) -> Callable:
    """`epoch(params, opt_state, data, keys, frozen, active) -> (params, opt_state, loss [C])`.

    `data` leaves are [C, S, B, ...], `keys` [C, S], `active` bool [C]. A step changes a client
    only if it is active and its batch has real examples (Adam would otherwise still move on
    its momentum), so stopped clients and padding are exact no-ops.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def client_step(params, opt_state, batch, key, frozen, active):
        (loss, _), grads = grad_fn(params, batch, key, frozen)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        n = jnp.sum(batch["mask"].astype(jnp.float32))
        ok = active & (n > 0)
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
        return pick(new_params, params), pick(new_opt, opt_state), jnp.where(ok, loss * n, 0.0), n

    vstep = jax.vmap(client_step, in_axes=(0, 0, 0, 0, None, 0))

    def epoch(params, opt_state, data, keys, frozen, active):
        steps = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), data)  # [S, C, B, ...]

        def body(carry, inp):
            p, o, loss_sum, count = carry
            batch, key = inp
            p, o, l_sum, n = vstep(p, o, batch, key, frozen, active)
            return (p, o, loss_sum + l_sum, count + n), None

        c = active.shape[0]
        zeros = jnp.zeros((c,), jnp.float32)
        (params, opt_state, loss_sum, count), _ = jax.lax.scan(
            body, (params, opt_state, zeros, zeros), (steps, jnp.swapaxes(keys, 0, 1))
        )
        return params, opt_state, loss_sum / jnp.maximum(count, 1.0)

    return jax.jit(epoch)


def make_eval_fn(
    eval_fn: PersonalEval, *, params_axis: int | None = 0, data_axis: int | None = 0
) -> Callable:
    """`evaluate(params, data, frozen) -> {"loss", "accuracy"[, "gate", "gate_var"]}`, each [C]
    (`gate_var`: the variance of the gate over the client's examples).

    `params_axis=0`: per-client params [C, ...]; `None`: one model for every client (e.g. the
    FedAvg model). `data_axis=0`: each client's own set [C, N, B, ...]; `None`: one shared set
    [N, B, ...] (the balanced global test set) seen by every client's model.
    """
    if params_axis is None and data_axis == 0:
        # One model, each client's data: clients one after another (`lax.map`), not vmapped,
        # so a layer's activations exist for one client's batch at a time (a conv lowered as
        # patches × matrix over 100 clients × 200 images made 10 GiB of patches).
        def vm(params, batch, frozen):
            return jax.lax.map(lambda b: eval_fn(params, b, frozen), batch)
    else:
        vm = jax.vmap(eval_fn, in_axes=(params_axis, data_axis, None))

    def evaluate(params, data, frozen):
        batches = data if data_axis is None else jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), data)

        def body(acc, batch):
            return jax.tree.map(jnp.add, acc, vm(params, batch, frozen)), None

        first = jax.tree.map(lambda x: x[0], batches)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
            vm, params, first, frozen))
        sums, _ = jax.lax.scan(body, zero, batches)
        count = jnp.maximum(sums["count"], 1.0)
        out = {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}
        if "gate_sum" in sums:
            out["gate"] = sums["gate_sum"] / count
        if "gate_sq_sum" in sums:  # E[g²] − E[g]², clipped at 0 against rounding
            out["gate_var"] = jnp.maximum(sums["gate_sq_sum"] / count - out["gate"] ** 2, 0.0)
        return out

    return jax.jit(evaluate)


@dataclass(frozen=True)
class FitConfig:
    """Per-client training with early stopping on the client's validation loss."""

    lr: float = 1e-3
    max_epochs: int = 20
    patience: int = 3
    # Whether the starting params (epoch 0) may be kept. True for fine-tuning and the mixture
    # (their start is a trained model); False for a model from scratch, whose random init must
    # never be reported as the "local model".
    keep_initial: bool = True


@dataclass(frozen=True)
class FitResult:
    params: Params  # [C, ...] each client's best-validation params
    best_val_loss: np.ndarray  # [C]
    best_epoch: np.ndarray  # [C] 0 = the initial params were best
    epochs_run: int


def step_keys(key: jax.Array, client_ids: jax.Array, num_steps: int) -> jax.Array:
    """[C, S] keys from (client id, step), so a client's randomness ignores its neighbours."""
    per_client = jax.vmap(lambda c: jax.random.fold_in(key, c))(client_ids)
    return jax.vmap(lambda k: jax.vmap(lambda s: jax.random.fold_in(k, s))(
        jnp.arange(num_steps)))(per_client)


@dataclass(frozen=True)
class Fitter:
    """The jitted epoch and validation functions of one method, built once per experiment so
    that every (skew, seed) cell reuses the compiled programs."""

    cfg: FitConfig
    epoch_fn: Callable
    evaluate: Callable
    optimizer: optax.GradientTransformation


def make_fitter(loss_fn: PersonalLoss, eval_fn: PersonalEval, cfg: FitConfig) -> Fitter:
    optimizer = optax.adam(cfg.lr)
    return Fitter(cfg, make_epoch_fn(loss_fn, optimizer), make_eval_fn(eval_fn), optimizer)


def fit_clients(
    fitter: Fitter,
    params: Params,
    train_data: Callable[[int], Batch],
    val_data: Batch,
    rng: jax.Array,
    frozen: Params = None,
    client_ids: np.ndarray | None = None,
) -> FitResult:
    """Train stacked per-client `params` [C, ...] with Adam, vectorised over clients.

    `train_data(epoch)` returns that epoch's [C, S, B, ...] arrays (reshuffled per epoch);
    `val_data` is [C, N, B, ...]. Each client keeps the params of its lowest validation loss
    (epoch 0 = before training counts unless `cfg.keep_initial` is False, so training can never
    make a client worse on validation) and stops after `patience` epochs without improvement;
    the loop ends when all have stopped.
    """
    cfg, evaluate = fitter.cfg, fitter.evaluate
    num_clients = jax.tree.leaves(params)[0].shape[0]
    ids = jnp.asarray(np.arange(num_clients) if client_ids is None else client_ids)
    opt_state = jax.vmap(fitter.optimizer.init)(params)
    best = params
    best_loss = evaluate(params, val_data, frozen)["loss"]
    if not cfg.keep_initial:
        best_loss = jnp.full_like(best_loss, jnp.inf)
    best_epoch = jnp.zeros((num_clients,), jnp.int32)
    bad = jnp.zeros((num_clients,), jnp.int32)
    epochs_run = 0
    for epoch in range(1, cfg.max_epochs + 1):
        active = bad < cfg.patience
        if not bool(jnp.any(active)):
            break
        data = train_data(epoch)
        keys = step_keys(jax.random.fold_in(rng, epoch), ids, data["mask"].shape[1])
        params, opt_state, _ = fitter.epoch_fn(params, opt_state, data, keys, frozen, active)
        val = evaluate(params, val_data, frozen)["loss"]
        improved = active & (val < best_loss)
        best = select_clients(improved, params, best)
        best_loss = jnp.where(improved, val, best_loss)
        best_epoch = jnp.where(improved, epoch, best_epoch)
        bad = jnp.where(improved, 0, bad + active.astype(jnp.int32))
        epochs_run = epoch
    return FitResult(best, np.asarray(best_loss), np.asarray(best_epoch), epochs_run)
