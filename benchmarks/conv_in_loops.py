"""Convolutions inside a `lax.scan` on XLA:CPU, and what it means for smcn (paper 3) training.

    PYTHONPATH=. python benchmarks/conv_in_loops.py [--out DIR]

XLA:CPU canonicalises a convolution (and hands it to its YNNPACK / Eigen kernels) only in the
entry computation; inside a `while` body autodiff's transposed gradient convolutions run as
naive loops. Part 1 times one 3x3 conv's weight gradient alone and inside a 4-step scan, for
autodiff's form and for `models/conv.py`'s custom VJP (canonical NHWC x HWIO gradients). Part 2
times paper 3's smcn training step (width 16, 3 seeds x batch 64, Adam) the ways the ABU
runner can run it: seeds `vmap`ped or `lax.map`ped, convs as patches x matrix or XLA's, steps
inside a `scan` or one jitted step per Python iteration. Everything is measured in one process,
interleaved, so the ratios compare; prints markdown (and writes DIR/conv_in_loops.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from fedjax_lm.models.cnn import image_classification_loss, make_cnn_model
from fedjax_lm.models.conv import xla_conv_valid

DIMS = ("NHWC", "HWIO", "NHWC")


def best_of(f, *args, reps: int = 3) -> float:
    jax.block_until_ready(f(*args))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        out.append(time.perf_counter() - t)
    return min(out)


def part1() -> list[str]:
    x = jax.random.normal(jax.random.key(0), (64, 34, 34, 16))
    k = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
    forms = {"autodiff of lax.conv": lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=DIMS),
        "custom VJP (models/conv.py)": xla_conv_valid}
    rows = ["| weight gradient of a 3x3 16->16 conv, 64 x 32 x 32 | alone (ms) | in a 4-step scan "
            "(ms a step) |", "|---|---|---|"]
    for name, conv in forms.items():
        grad = jax.grad(lambda k, x, conv=conv: (conv(x, k) ** 2).sum())
        alone = best_of(jax.jit(grad), k, x)
        scan = jax.jit(lambda k, x, grad=grad: jax.lax.scan(
            lambda c, _: (c + 1e-3 * grad(c, x), None), k, None, length=4)[0])
        rows.append(f"| {name} | {alone * 1e3:.1f} | {best_of(scan, k, x) / 4 * 1e3:.1f} |")
    return rows


def part2(activations: list[str], steps: int = 4) -> list[str]:
    runs, batch = 3, 64
    xs = jax.random.normal(jax.random.key(0), (steps, runs, batch, 32, 32, 3))
    ys = jax.random.randint(jax.random.key(1), (steps, runs, batch), 0, 10)
    keys = jax.random.split(jax.random.key(2), steps * runs).reshape(steps, runs)
    rows = ["| activation | convs | seeds | steps | ms a step |", "|---|---|---|---|---|"]
    for act in activations:
        for impl, seeds, loop in (("patches", "vmap", "scan"), ("patches", "map", "scan"),
                                  ("xla", "map", "scan"), ("xla", "map", "python"),
                                  ("patches", "vmap", "python")):
            model = make_cnn_model("smcn", 10, act, width=16, init="paper", conv_impl=impl)
            loss = image_classification_loss(model)
            opt = optax.adam(1e-3)
            params = jax.vmap(model.init)(jax.random.split(jax.random.key(3), runs))
            state = jax.vmap(opt.init)(params)

            def step(p, o, x, y, k, loss=loss, opt=opt):
                batch = {"image": x, "label": y, "mask": jnp.ones(y.shape)}
                g = jax.grad(lambda p: loss(p, batch, k)[0])(p)
                u, o = opt.update(g, o, p)
                return optax.apply_updates(p, u), o

            if seeds == "vmap":
                per_seed = jax.vmap(step)
            else:
                per_seed = lambda *a, step=step: jax.lax.map(lambda t: step(*t), a)
            if loop == "scan":
                f = jax.jit(lambda p, o, per_seed=per_seed: jax.lax.scan(
                    lambda c, i: (per_seed(*c, *i), None), (p, o), (xs, ys, keys))[0])
            else:
                one = jax.jit(per_seed)

                def f(p, o, one=one):
                    for i in range(steps):
                        p, o = one(p, o, xs[i], ys[i], keys[i])
                    return p, o
            ms = best_of(f, params, state) / steps * 1e3
            rows.append(f"| {act} | {impl} | {seeds} | {loop} | {ms:.1f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--activations", default="relu,abu_n")
    args = p.parse_args()
    lines = [f"jax {jax.__version__}, {jax.devices()[0].platform}", "", *part1(), ""]
    print("\n".join(lines), flush=True)
    lines += part2(args.activations.split(","))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "conv_in_loops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
