"""pfl-research's framework-comparison workload (Granqvist et al., NeurIPS 2024, Tables 1-2;
`publications/pfl` and `benchmarks/image_classification/configs/baseline.yaml` of
apple/pfl-research), reimplemented for our engine, and the same workload handed to the peers.

CIFAR-10, IID: 1,000 clients of 50 training images each (a seeded permutation), 50 clients
sampled uniformly each round, one local epoch of SGD at learning rate 0.1 with batch 10 (5
steps), FedAvg with a server SGD step of 1.0 (the mean; every client weighs the same), their
`simple_cnn` (`models/cnn.PflSimpleCnn`), images scaled to [0, 1] and normalised with the
per-channel mean / std of their Flower setup, the whole 10,000-image test set evaluated every
`eval_every` rounds. They run 1,500 rounds; the Flower config expects 72.8 % accuracy.

`export_for_peers` writes the uint8 images, labels and the client partition to one .npz that
the peer scripts (`benchmarks/peers/*_cifar10.py`) read, so every framework trains the same
clients on the same pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm.data.cifar import CIFAR10_TARBALL, load_cifar10_arrays

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], np.float32)
REPORTED_ACCURACY = 0.728  # `expected_accuracy` of publications/pfl/flower/cifar10 (FedAvg)


@dataclasses.dataclass(frozen=True)
class PflCifar10:
    """The workload's knobs, at the paper's values."""

    num_clients: int = 1000
    per_client: int = 50
    cohort: int = 50
    batch_size: int = 10
    local_epochs: int = 1
    local_lr: float = 0.1
    server_lr: float = 1.0
    rounds: int = 1500
    eval_every: int = 10
    eval_batch: int = 1000
    seed: int = 0

    @property
    def local_steps(self) -> int:
        return self.local_epochs * self.per_client // self.batch_size


@dataclasses.dataclass(frozen=True)
class Cifar10Federation:
    """uint8 train / test images, labels, and `partition[c]` = client c's train indices."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    partition: np.ndarray  # [num_clients, per_client] int64


def load_federation(data_dir: Path, w: PflCifar10) -> Cifar10Federation:
    """CIFAR-10 from `data_dir` (decoded once, cached), split IID into equal clients."""
    arrays, _ = load_cifar10_arrays(Path(data_dir) / CIFAR10_TARBALL)
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    need = w.num_clients * w.per_client
    if need > len(ytr):
        raise ValueError(f"{w.num_clients} clients x {w.per_client} images need {need} "
                         f"training images; CIFAR-10 has {len(ytr)}")
    perm = np.random.default_rng(w.seed).permutation(len(ytr))[:need]
    return Cifar10Federation(xtr, ytr, xte, yte, perm.reshape(w.num_clients, w.per_client))


def export_for_peers(fed: Cifar10Federation, path: Path) -> Path:
    """One .npz (uncompressed uint8) with everything a peer needs to train the same clients."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, train_images=fed.train_images, train_labels=fed.train_labels,
             test_images=fed.test_images, test_labels=fed.test_labels,
             partition=fed.partition, mean=MEAN, std=STD)
    tmp.replace(path)
    return path


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC → float32, scaled to [0, 1] and standardised per channel."""
    return (images.astype(np.float32) / 255.0 - MEAN) / STD


def cohort_ids(w: PflCifar10, round_idx: int) -> np.ndarray:
    """The round's clients: `cohort` of `num_clients`, uniformly without replacement."""
    rng = np.random.default_rng([w.seed, 1, round_idx])
    return np.sort(rng.choice(w.num_clients, w.cohort, replace=False))


def cohort_batches(fed: Cifar10Federation, w: PflCifar10, ids: np.ndarray, round_idx: int
                   ) -> dict[str, np.ndarray]:
    """The cohort's local epochs as engine data, leaves [C, S, B, ...]; each client's images
    shuffled afresh every round."""
    rng = np.random.default_rng([w.seed, 2, round_idx])
    order = np.stack([rng.permutation(w.per_client) for _ in ids])
    idx = np.concatenate([fed.partition[ids][np.arange(len(ids))[:, None], order]
                          for _ in range(w.local_epochs)], axis=1)
    shape = (len(ids), w.local_steps, w.batch_size)
    return {"image": normalize(fed.train_images[idx]).reshape(shape + (32, 32, 3)),
            "label": fed.train_labels[idx].reshape(shape).astype(np.int32),
            "mask": np.ones(shape, np.float32)}


def make_eval(model: Any, w: PflCifar10, fed: Cifar10Federation) -> Any:
    """`evaluate(params) -> (accuracy, mean loss)` over the whole test set."""
    from fedjax_lm.models.cnn import image_classification_eval

    eval_fn = jax.jit(image_classification_eval(model))
    images = normalize(fed.test_images)

    def evaluate(params: Any) -> tuple[float, float]:
        correct = loss = 0.0
        for s in range(0, len(images), w.eval_batch):
            aux = eval_fn(params, {"image": jnp.asarray(images[s:s + w.eval_batch]),
                                   "label": jnp.asarray(fed.test_labels[s:s + w.eval_batch])})
            correct += float(aux["correct"])
            loss += float(aux["loss_sum"])
        return correct / len(images), loss / len(images)

    return evaluate


def run_ours(fed: Cifar10Federation, w: PflCifar10, rounds: int, *, backend: str = "vmap",
             chunk: int | None = None, executor: str = "host", conv_impl: str = "patches",
             log: Any = print) -> dict[str, Any]:
    """Train `rounds` rounds with our engine; per-round times (the round program and the host's
    batch packing, not evaluation) and each evaluation's accuracy with the training wall time
    so far."""
    import optax

    from fedjax_lm import federated as fl
    from fedjax_lm.models.cnn import image_classification_loss, make_cnn_model

    model = make_cnn_model("pfl_cnn", 10, conv_impl=conv_impl)
    engine = fl.build_engine(image_classification_loss(model), optax.sgd(w.local_lr),
                             None if w.server_lr == 1.0 else optax.sgd(w.server_lr),
                             weighting="uniform", backend=backend, clients_per_chunk=chunk,
                             chunk_executor=executor)
    evaluate = make_eval(model, w, fed)
    state = engine.init(model.init(jax.random.key(w.seed)), jax.random.key(w.seed + 1))
    times, evals, train_s = [], [], 0.0
    for r in range(rounds):
        t = time.perf_counter()
        ids = cohort_ids(w, r)
        result = engine.run_round(state, cohort_batches(fed, w, ids, r), client_ids=ids)
        state = jax.block_until_ready(result.state)
        times.append(time.perf_counter() - t)
        train_s += times[-1]
        if (r + 1) % w.eval_every == 0 or r + 1 == rounds:
            acc, loss = evaluate(state.params)
            evals.append({"round": r + 1, "accuracy": acc, "loss": loss, "train_s": train_s})
            log(f"[ours] round {r + 1}: accuracy {acc:.4f} loss {loss:.4f} "
                f"train {train_s:.1f}s (last round {times[-1]:.2f}s)")
    return {"framework": "ours", "setting": _our_label(backend, chunk, executor, conv_impl),
            "round_times_s": times, "evals": evals}


def _our_label(backend: str, chunk: int | None, executor: str, conv_impl: str) -> str:
    spec = backend if chunk is None else f"{backend}@{chunk}{'s' if executor == 'scan' else ''}"
    return f"{spec},conv={conv_impl}"


# -- the side-by-side run: ours, pfl-research and Flower on the same federation --------------

PEER_SCRIPTS = {"pfl": "pfl_cifar10.py", "flower": "flower_cifar10.py"}


def parse_setting(text: str) -> dict[str, str]:
    """`actors=2,threads=1` → {"actors": "2", "threads": "1"}."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"bad setting {part!r} in {text!r}: use key=value,...")
        out[key.strip()] = value.strip()
    return out


def run_peer_cifar(framework: str, data: Path, w: PflCifar10, rounds: int, setting: str,
                   timeout_s: float) -> dict[str, Any]:
    """One peer run in the peers venv: its JSON result, or a `status: failed` record."""
    from fedjax_lm.bench.peers import peers_python, run_peer_script

    python = peers_python()
    base = {"framework": framework, "setting": setting}
    if not python.exists():
        return {**base, "status": "failed", "error": f"peers venv python not found at {python}: "
                "`make peers` builds it"}
    args = ["--data", str(data), "--rounds", str(rounds), "--eval-every", str(w.eval_every),
            "--cohort", str(w.cohort), "--batch-size", str(w.batch_size), "--local-epochs",
            str(w.local_epochs), "--local-lr", str(w.local_lr), "--seed", str(w.seed)]
    args += [f"--{k}={v}" for k, v in parse_setting(setting).items()]
    return run_peer_script(PEER_SCRIPTS[framework], args, base, timeout_s, python)


def run_ours_setting(fed: Cifar10Federation, w: PflCifar10, rounds: int, setting: str
                     ) -> dict[str, Any]:
    """`vmap@10s,conv=patches` → run_ours with that backend spec and conv lowering."""
    from fedjax_lm.bench.grid import parse_backend

    spec, _, rest = setting.partition(",")
    b = parse_backend(spec)
    conv = parse_setting(rest).get("conv", "patches")
    try:
        res = run_ours(fed, w, rounds, backend=b.backend, chunk=b.chunk, executor=b.executor,
                       conv_impl=conv)
    except Exception as e:  # noqa: BLE001 — a failed framework is a row, not a crash
        return {"framework": "ours", "setting": setting, "status": "failed",
                "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {**res, "setting": setting, "status": "ok"}


def summarize_run(res: dict[str, Any], target: float) -> dict[str, Any]:
    """Steady s/round (median after the first round, which compiles / starts workers), the
    training time to `target` accuracy (None if not reached), and the last evaluation."""
    import statistics

    if res.get("status") != "ok":
        return {"framework": res["framework"], "setting": res["setting"], "status": "failed",
                "error": res.get("error")}
    times = res["round_times_s"]
    reached = next((e for e in res["evals"] if e["accuracy"] >= target), None)
    last = res["evals"][-1] if res["evals"] else {}
    return {"framework": res["framework"], "setting": res["setting"], "status": "ok",
            "rounds": len(times), "first_round_s": times[0],
            "round_s": statistics.median(times[1:] or times),
            "train_s": sum(times), "accuracy": last.get("accuracy"), "loss": last.get("loss"),
            "target_round": reached["round"] if reached else None,
            "target_train_s": reached["train_s"] if reached else None}


def common_accuracy(runs: list[dict[str, Any]]) -> float | None:
    """The best accuracy every framework that ran reached at some evaluation: the level at
    which their times can be compared (the paper's target is out of reach in a short run);
    None with fewer than two."""
    bests = [max(e["accuracy"] for e in r["evals"]) for r in runs
             if r.get("status") == "ok" and r["evals"]]
    return min(bests) if len(bests) >= 2 else None


def render(result: dict[str, Any]) -> str:
    w, rows = result["workload"], result["summary"]
    common = result["common_accuracy"]
    lines = [
        "# pfl-research's CIFAR-10 benchmark: ours, pfl-research, Flower", "",
        f"- workload: {w['num_clients']} clients × {w['per_client']} images (IID), "
        f"{w['cohort']} a round, batch {w['batch_size']}, {w['local_epochs']} local epoch "
        f"(SGD {w['local_lr']}), server lr {w['server_lr']}; pfl's simple_cnn; "
        f"{result['rounds']} rounds (the paper runs {w['rounds']}), test set every "
        f"{w['eval_every']}",
        f"- machine: {result['machine']}; load average {result['loadavg_start']} at start, "
        f"{result['loadavg_end']} at end; started {result['started']}, {result['wall_s'] / 60:.1f}"
        " min",
        "- round s: median training round after the first (evaluation excluded); train s: "
        "all rounds; 'to X' = training seconds until the first evaluation at or above X",
        "", f"| framework | setting | rounds | round s | × ours | first round s | train s | "
        f"accuracy | loss | to {common if common is None else f'{common:.3f}'} (s) | "
        f"to {REPORTED_ACCURACY} (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ours = next((r for r in rows if r["framework"] == "ours" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['framework']} | {r['setting']} | failed: {r.get('error')} |"
                         + " |" * 8)
            continue
        ratio = r["round_s"] / ours["round_s"] if ours else None
        lines.append(
            f"| {r['framework']} | {r['setting']} | {r['rounds']} | {r['round_s']:.3f} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | {r['first_round_s']:.2f} | "
            f"{r['train_s']:.1f} | {r['accuracy']:.4f} | {r['loss']:.4f} | "
            f"{_fmt(r.get('common_train_s'))} | {_fmt(r['target_train_s'])} |")
    if result.get("probes"):
        lines += ["", "## Settings probed (steady s/round over the probe rounds; the fastest "
                  "ran above)", "", "| framework | setting | rounds | round s |",
                  "|---|---|---|---|"]
        for p in result["probes"]:
            lines.append(f"| {p['framework']} | {p['setting']} | {p.get('rounds', '—')} | "
                         f"{_fmt(p.get('round_s'), '.3f')}"
                         + ("" if p["status"] == "ok" else f" failed: {p.get('error')}") + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def _plot(runs: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        if r.get("status") != "ok" or not r["evals"]:
            continue
        label = f"{r['framework']} ({r['setting']})"
        acc = [e["accuracy"] for e in r["evals"]]
        axes[0].plot([e["round"] for e in r["evals"]], acc, "-o", ms=3, label=label)
        axes[1].plot([e["train_s"] for e in r["evals"]], acc, "-o", ms=3, label=label)
    axes[0].set(xlabel="round", ylabel="test accuracy", title="accuracy by round")
    axes[1].set(xlabel="training seconds (evaluation excluded)", ylabel="test accuracy",
                title="accuracy by training time")
    for ax in axes:
        ax.axhline(REPORTED_ACCURACY, color="gray", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    """`python -m fedjax_lm.bench.pfl_cifar10`: bad input one line and exit 2, as `fedjax-lm`."""
    from fedjax_lm.entry import module_main

    return module_main("python -m fedjax_lm.bench.pfl_cifar10", __doc__.split("\n\n")[0],
                       _add_arguments, _run, argv)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="holds cifar10/cifar10_jpeg.tar.gz")
    p.add_argument("--rounds", type=int, default=50, help="rounds per framework (same for all)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--frameworks", default="ours,pfl,flower")
    p.add_argument("--ours", default="vmap,conv=patches",
                   help="';'-separated settings: backend spec[,conv=xla|patches]")
    p.add_argument("--pfl", default="workers=1,threads=2;workers=2,threads=1",
                   help="';'-separated settings (workers=W,threads=T)")
    p.add_argument("--flower", default="actors=2,threads=1",
                   help="';'-separated settings (actors=A,threads=T)")
    p.add_argument("--probe-rounds", type=int, default=4,
                   help="a framework with several settings runs each this many rounds first; "
                        "the fastest steady round runs the full comparison")
    p.add_argument("--peer-timeout", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=1000, help="population (smaller: a smoke run)")
    p.add_argument("--cohort", type=int, default=50, help="clients a round (smaller: a smoke run)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report-only", action="store_true",
                   help="re-read OUT/compare.json and rewrite its summary, report and plot")


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    import json
    import os
    import platform

    from fedjax_lm.data import DataError
    from fedjax_lm.data.sources import resolve_cache_dir, resolve_data_dir
    from fedjax_lm.io import atomic_savefig, atomic_write_text

    if args.report_only and not (args.out / "compare.json").is_file():
        raise DataError(f"no {args.out / 'compare.json'}: run the comparison first")
    if args.report_only:
        old = json.loads((args.out / "compare.json").read_text())
        w = PflCifar10(**old["workload"])
        result = {**old, **{k: v for k, v in _result(
            w, old["rounds"], old["runs"], old["probes"], old["started"], 0.0,
            tuple(old["loadavg_start"]), old["machine"]).items()
            if k in ("summary", "common_accuracy")}}
        atomic_write_text(args.out / "compare.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(args.out / "report.md", render(result))
        atomic_savefig(_plot(result["runs"]), args.out / "curves.png", dpi=90)
        print(render(result))
        return 0
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is None:
        raise DataError("no data dir: pass --data-dir (the folder holding "
                        "cifar10/cifar10_jpeg.tar.gz)")
    w = PflCifar10(num_clients=args.clients, cohort=args.cohort, eval_every=args.eval_every,
                   seed=args.seed)
    started, load_start, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), os.getloadavg(), time.time()
    fed = load_federation(data_dir, w)
    npz = export_for_peers(fed, resolve_cache_dir(None, "pfl_cifar10")
                           / f"federation-{w.num_clients}x{w.per_client}-seed{w.seed}.npz")
    frameworks = [f for f in args.frameworks.split(",") if f]
    settings = {f: [s for s in getattr(args, f).split(";") if s] for f in frameworks}

    def run(framework: str, setting: str, rounds: int, wl: PflCifar10) -> dict[str, Any]:
        print(f"[pfl-cifar10] {framework} [{setting}] {rounds} rounds", flush=True)
        if framework == "ours":
            return run_ours_setting(fed, wl, rounds, setting)
        return run_peer_cifar(framework, npz, wl, rounds, setting, args.peer_timeout)

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"jax {jax.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)
    probes: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    probe_w = dataclasses.replace(w, eval_every=10**9)
    # One framework at a time, its probes then its full run: no other framework's processes
    # (a Flower run's Ray daemons shutting down) run between them. Written after every
    # framework: a run cut short keeps the finished ones.
    for f in frameworks:
        chosen = settings[f][0]
        if len(settings[f]) > 1 and args.probe_rounds > 0:
            rows = [summarize_run(run(f, s, args.probe_rounds, probe_w), 1.0)
                    for s in settings[f]]
            probes += rows
            ok = [r for r in rows if r["status"] == "ok"]
            chosen = min(ok, key=lambda r: r["round_s"])["setting"] if ok else chosen
        runs.append(run(f, chosen, args.rounds, w))
        result = _result(w, args.rounds, runs, probes, started, t0, load_start, machine)
        atomic_write_text(args.out / "compare.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(args.out / "report.md", render(result))
        atomic_savefig(_plot(runs), args.out / "curves.png", dpi=90)
    print(render(result))
    return 0 if all(s["status"] == "ok" for s in result["summary"]) else 1


def _result(w: PflCifar10, rounds: int, runs: list[dict[str, Any]], probes: list[dict[str, Any]],
            started: str, t0: float, load_start: tuple[float, ...], machine: str
            ) -> dict[str, Any]:
    import os

    common = common_accuracy(runs)
    summary = []
    for r in runs:
        s = summarize_run(r, REPORTED_ACCURACY)
        if common is not None and s["status"] == "ok":
            s["common_train_s"] = next(e["train_s"] for e in r["evals"]
                                       if e["accuracy"] >= common)
        summary.append(s)
    return {"workload": dataclasses.asdict(w), "rounds": rounds, "started": started,
            "wall_s": time.time() - t0, "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(), "common_accuracy": common,
            "reported_accuracy": REPORTED_ACCURACY, "machine": machine, "probes": probes,
            "summary": summary, "runs": runs}

if __name__ == "__main__":
    raise SystemExit(main())
