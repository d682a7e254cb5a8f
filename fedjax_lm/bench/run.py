"""`fedjax-lm bench`: time rounds per backend × client count, against PyTorch peers.

Each group's in-process backends share one engine per backend across the client sweep (so
compile counts are what a user's sweep pays). Multi-device backends (mesh, pmap) on a CPU with
one device run in a child process with `--xla_force_host_platform_device_count=2`, since the
flag must be set before jax starts. Peers run in their own venv (`peers.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedjax_lm.bench import grid as g
from fedjax_lm.bench.peers import PEERS, peer_settings, run_peer, setting_label

FIELDS = ("backend", "clients", "compile_s", "round_s", "examples_per_s", "tokens_per_s",
          "flops_per_s", "roofline_fraction", "peak_mem_bytes", "compiles")


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to a `fedjax-lm` subparsers object."""
    p = subparsers.add_parser("bench", help="time rounds per backend and client count, "
                              "compare with PyTorch peers; writes bench.json and report.md")
    add_arguments(p)
    p.set_defaults(func=run_bench)
    return p


def _csv(kind: type) -> Any:
    def parse(s: str) -> tuple:
        return tuple(kind(x) for x in s.split(",") if x)

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse: "invalid ... value: 'x'"
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(g.PRESETS),
                   help="a whole grid (cpu: this machine's; gpu: one H100/H200); the "
                        "workload flags below then only fill what the preset leaves open")
    p.add_argument("--model", default="tiny", choices=("tiny", "mini", "small", "base"))
    p.add_argument("--clients", type=_csv(int), default=(1, 2, 4, 8))
    p.add_argument("--backends", type=_csv(str), default=("loop", "vmap"),
                   help="loop,vmap,mesh,pmap; vmap@K = clients_per_chunk K (host executor)")
    p.add_argument("--chunk", type=int, default=None,
                   help="also run vmap with clients_per_chunk=CHUNK (host executor)")
    p.add_argument("--rounds", type=int, default=5, help="steady rounds after the first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--peers", type=_csv(str), default=(), help=f"some of {','.join(PEERS)}")
    p.add_argument("--peer-clients", type=_csv(int), default=None,
                   help="client counts at which to run peers (default: all)")
    p.add_argument("--peer-timeout", type=float, default=900.0)
    p.add_argument("--peer-sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="run each peer over its small settings sweep (Flower: Ray actors x "
                        "torch threads; pfl / torch-loop: threads) and compare with its best "
                        "(default); --no-peer-sweep runs each peer once with its defaults")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype")
    p.add_argument("--attention-impl", default="xla", choices=("xla", "dot_product"))
    p.add_argument("--remat", action="store_true")
    p.add_argument("--peft", choices=("none", "lora", "head", "bitfit"), default="none",
                   help="parameter-efficient clients (only the trainable leaves per client)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="query,value")
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="profile N more rounds per cell and report where device time goes")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/bench.json, report.md")
    p.add_argument("--child-devices", type=int, default=2,
                   help="CPU devices for mesh/pmap in the child process")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # child: a group JSON


# Whole-number flags: (smallest value, what the flag gives; the fix names it).
_COUNTS = {
    "rounds": (1, "the steady rounds timed after the first"),
    "batch_size": (1, "the examples per local step"),
    "max_length": (1, "the tokens per example"),
    "local_steps": (1, "the local steps per client and round"),
    "lora_rank": (1, "the rank of the LoRA adapters"),
    "trace": (0, "the rounds to profile per cell (0: none)"),
    "child_devices": (1, "the CPU devices of the mesh/pmap child process"),
}


def check_args(args: argparse.Namespace) -> None:
    """Refuse flags no cell could measure, one ConfigError line each, before anything runs
    (a cell that fails is a result; a whole grid that cannot run is bad input)."""
    from fedjax_lm.grid import ConfigError, check_counts

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    check_counts(args, _COUNTS)
    need(args.chunk is None or args.chunk >= 1,
         f"--chunk must be >= 1, got {args.chunk}: give the clients per chunk, or leave it out")
    need(0 < args.peer_timeout < float("inf"),
         f"--peer-timeout must be a number of seconds > 0, got {args.peer_timeout}")
    for flag, counts in (("--clients", args.clients), ("--peer-clients", args.peer_clients)):
        need(counts is None or len(counts) >= 1,
             f"{flag} lists no client count: give some, e.g. {flag} 1,2,4")
        bad = [c for c in counts or () if c < 1]
        need(not bad, f"{flag} must be >= 1 each, got {','.join(map(str, bad))}: give "
                      f"client counts such as {flag} 1,2,4")
    unknown = [p for p in args.peers if p not in PEERS]
    need(not unknown, f"unknown peer {', '.join(map(repr, unknown))} in --peers; valid: "
                      f"{', '.join(PEERS)}")
    need(args.peft == "none" or not args.peers,
         "the peers fine-tune every parameter; run --peft without --peers")
    need(len(args.backends) >= 1 or bool(args.chunk) or bool(args.preset),
         f"--backends lists no backend: give some of {','.join(g.BACKENDS)}")
    for b in args.backends:
        try:
            g.parse_backend(b)
        except ValueError as e:
            raise ConfigError(f"--backends: {e}") from None
    if not args.preset:  # the model's own limits: positions, LoRA targets and rank
        from fedjax_lm.bench.workload import Workload, encoder_config

        cfg = encoder_config(Workload(args.model, 1, args.local_steps, args.batch_size,
                                      args.max_length, args.dtype, args.attention_impl,
                                      args.remat, args.peft, args.lora_rank, args.lora_targets))
        need(args.max_length <= cfg.max_position_embeddings,
             f"--max-length {args.max_length} exceeds model {args.model}'s "
             f"{cfg.max_position_embeddings} positions; use --max-length "
             f"{cfg.max_position_embeddings} or less")


def groups_from_args(args: argparse.Namespace) -> tuple[g.Group, ...]:
    check_args(args)
    if args.preset:
        return g.PRESETS[args.preset]
    backends = tuple(args.backends) + ((f"vmap@{args.chunk}",) if args.chunk else ())
    return (g.Group(args.model, args.max_length, tuple(args.clients), backends,
                    tuple(args.peers), args.peer_clients, args.optimizer, args.dtype,
                    args.attention_impl, args.remat, args.batch_size, args.local_steps,
                    peft=args.peft, lora_rank=args.lora_rank, lora_targets=args.lora_targets),)


def machine_info() -> dict[str, Any]:
    import jax

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": socket.gethostname().split(".")[0], "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run_bench(args: argparse.Namespace) -> int:
    """Run the grid, write OUT/bench.json and OUT/report.md (+ PNG) atomically; exit status 1
    when no cell measured anything."""
    groups = () if args.worker else groups_from_args(args)  # bad flags: before any work
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # compile_s must be real
    if args.worker:
        return _run_worker(args)
    from fedjax_lm.bench.measure import matmul_roofline
    from fedjax_lm.bench.report import write_outputs

    started = time.time()
    load_start = os.getloadavg()
    rooflines: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for group in groups:
        group = skip_past_oom(group, rows)
        if not group.clients:
            continue
        # Re-measured before every group: on a shared machine the ceiling moves with the load.
        rooflines[group.dtype] = matmul_roofline(group.dtype)
        rows += run_group(group, args, dict(rooflines))
        _add_ratios(rows)  # across groups too: a variant group is compared with the loop
        # Written after every group: a run cut short by a timeout still leaves its results.
        write_outputs(_result(args, groups, rows, rooflines, started, load_start,
                              complete=False), args.out)
    write_outputs(_result(args, groups, rows, rooflines, started, load_start, complete=True),
                  args.out)
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'report.md'}")
    if not any(r.get("status") == "ok" for r in rows):  # a run that measured nothing failed
        first = next((r["error"] for r in rows if r.get("error")), "no cell ran")
        first = " ".join(str(first).split())[:200]
        print(f"fedjax-lm bench: error: every cell failed ({len(rows)} cells; first: {first}); "
              f"see {args.out / 'report.md'}", file=sys.stderr)
        return 1
    return 0


def skip_past_oom(group: g.Group, rows: list[dict[str, Any]]) -> g.Group:
    """A `stop_at_oom` group drops the client counts at or past one that already ran out of
    memory in an earlier group with the same model and backend (it could only fail again)."""
    if not group.stop_at_oom:
        return group
    labels = {cell_label(group, s) for s in group.specs()}
    oom = [r["clients"] for r in rows if r.get("oom") and r["model"] == group.model
           and r["label"] in labels]
    if not oom:
        return group
    return dataclasses.replace(group, clients=tuple(c for c in group.clients if c < min(oom)))


def _result(args: argparse.Namespace, groups: tuple[g.Group, ...], rows: list[dict[str, Any]],
            rooflines: dict[str, float], started: float, load_start: tuple[float, ...],
            complete: bool) -> dict[str, Any]:
    return {
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": time.time() - started,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "roofline_flops_per_s": rooflines,
        "rounds": args.rounds,
        "groups": [dataclasses.asdict(gr) for gr in groups],
        "complete": complete,
        "rows": rows,
    }


def run_group(group: g.Group, args: argparse.Namespace, rooflines: dict[str, float]
              ) -> list[dict[str, Any]]:
    """Our backends (in process, or in a multi-device child) then the peers, for one group."""
    import jax

    specs = group.specs()
    need_child = jax.default_backend() == "cpu" and jax.device_count() < 2
    local = [s for s in specs if not (s.multi_device and need_child)]
    remote = [s for s in specs if s.multi_device and need_child]
    rows = _run_local(group, local, args.rounds, rooflines, getattr(args, "trace", 0))
    if remote:
        rows += _run_child(dataclasses.replace(group, backends=tuple(s.label for s in remote),
                                               peers=()), args)
    rows += _run_peers(group, args, rooflines)
    _add_ratios(rows)
    return rows


def cell_label(group: g.Group, spec: g.BackendSpec) -> str:
    """The backend spec, plus what the group changes in the workload (fused attention has no
    dropout on the probabilities; remat recomputes activations)."""
    peft = {"none": "", "lora": f"+lora{group.lora_rank}"}.get(group.peft, f"+{group.peft}")
    return (spec.label + ("+dpa" if group.attention_impl == "dot_product" else "")
            + ("+remat" if group.remat else "") + peft)


def _cell_base(group: g.Group, spec: g.BackendSpec | None, clients: int) -> dict[str, Any]:
    return {"model": group.model, "label": cell_label(group, spec) if spec else None,
            "backend": spec.backend if spec else None, "chunk": spec.chunk if spec else None,
            "chunk_executor": spec.executor if spec and spec.chunk else None,
            "clients": clients, "local_steps": group.local_steps,
            "batch_size": group.batch_size, "max_length": group.max_length,
            "optimizer": group.optimizer, "dtype": group.dtype,
            "attention_impl": group.attention_impl, "remat": group.remat, "peft": group.peft}


def _run_local(group: g.Group, specs: list[g.BackendSpec], rounds: int,
               rooflines: dict[str, float], trace: int = 0) -> list[dict[str, Any]]:
    import jax

    from fedjax_lm.bench.measure import make_engine, run_cell
    from fedjax_lm.bench.workload import Workload, build, trainable_mask

    rows: list[dict[str, Any]] = []
    if not specs:
        return rows
    w0 = Workload(group.model, 1, group.local_steps, group.batch_size, group.max_length,
                  group.dtype, group.attention_impl, group.remat, group.peft, group.lora_rank,
                  group.lora_targets)
    model, params, loss_fn = build(w0)
    mask = trainable_mask(w0, params)
    roofline = rooflines.get(group.dtype)
    for spec in specs:
        engine = make_engine(loss_fn, spec.backend, group.optimizer, spec.chunk, spec.executor,
                             trainable=mask)
        for c in group.clients:
            row = _cell_base(group, spec, c)
            row["devices"] = engine.num_devices
            try:
                cell = run_cell(engine, model, params, dataclasses.replace(w0, clients=c), rounds,
                                trace_rounds=trace)
            except Exception as e:  # noqa: BLE001 — a failed cell is a result, not a crash
                msg = f"{type(e).__name__}: {str(e)[:500]}"
                rows.append({**row, "status": "failed", "error": msg,
                             "oom": "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg})
                print(f"[bench] {group.model} {spec.label} C={c}: FAILED {msg[:200]}",
                      flush=True)
                if group.stop_at_oom:
                    break
                continue
            cell["roofline_flops_per_s"] = roofline
            cell["roofline_fraction"] = cell["flops_per_s"] / roofline if roofline else None
            cell["loadavg"] = os.getloadavg()
            rows.append({**row, "status": "ok", **cell})
            print(f"[bench] {group.model} {spec.label:8s} C={c:<3d} round {cell['round_s']:.3f}s "
                  f"compile {cell['compile_s']:.1f}s {cell['flops_per_s'] / 1e9:.1f} GFLOP/s "
                  f"compiles {cell['compiles']} load {os.getloadavg()[0]:.1f}", flush=True)
        jax.clear_caches()  # free the previous engine's executables
    return rows


def _run_child(group: g.Group, args: argparse.Namespace) -> list[dict[str, Any]]:
    """mesh / pmap in a child process with several forced CPU devices."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "group.json"
        spec_path.write_text(json.dumps(dataclasses.asdict(group)))
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                            f"{args.child_devices}").strip()
        cmd = [sys.executable, "-m", "fedjax_lm.bench", "--worker", str(spec_path),
               "--rounds", str(args.rounds), "--trace", str(getattr(args, "trace", 0)),
               "--out", tmp]
        try:
            proc = subprocess.run(cmd, env=env, timeout=3600, stdout=None, stderr=subprocess.PIPE,
                                  text=True)
            out = Path(tmp) / "rows.json"
            if proc.returncode == 0 and out.exists():
                return json.loads(out.read_text())
            error, tail = f"exit status {proc.returncode}", proc.stderr[-3000:]
        except subprocess.TimeoutExpired as e:
            error, tail = "timed out after 3600 s", str(e.stderr)[-3000:]
    return [{**_cell_base(group, s, c), "status": "failed", "error": error, "stderr_tail": tail}
            for s in group.specs() for c in group.clients]


def _run_worker(args: argparse.Namespace) -> int:
    from fedjax_lm.bench.measure import matmul_roofline

    fields = json.loads(args.worker.read_text())
    group = g.Group(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    rows = _run_local(group, group.specs(), args.rounds, {group.dtype: matmul_roofline(
        group.dtype)}, args.trace)
    (args.out / "rows.json").write_text(json.dumps(rows))
    return 0


def _run_peers(group: g.Group, args: argparse.Namespace, rooflines: dict[str, float]
               ) -> list[dict[str, Any]]:
    from fedjax_lm.bench.workload import Workload, encoder_config, peer_config

    cfg = encoder_config(Workload(group.model, 1, group.local_steps, group.batch_size,
                                  group.max_length, group.dtype, group.attention_impl))
    roofline = rooflines.get(group.dtype)
    rows = []
    clients = group.clients if group.peer_clients is None else group.peer_clients
    sweep = getattr(args, "peer_sweep", True)
    for peer in group.peers:
        settings = peer_settings(peer, os.cpu_count() or 1) if sweep else ({},)
        for c in clients:
            cell_rows = []
            for setting in settings:
                res = run_peer(peer, peer_config(cfg), clients=c, rounds=args.rounds,
                               local_steps=group.local_steps, batch_size=group.batch_size,
                               max_length=group.max_length, optimizer=group.optimizer,
                               timeout_s=args.peer_timeout, setting=setting)
                cell_rows.append(_peer_row(group, peer, c, setting, res, cfg, roofline))
                if "peers venv python not found" in str(res.get("error")):
                    break  # no setting can run without the venv: one row says why
            ok = [r for r in cell_rows if r["status"] == "ok"]
            if ok:
                min(ok, key=lambda r: r["round_s"])["peer_best"] = True
            rows += cell_rows
    return rows


def _peer_row(group: g.Group, peer: str, c: int, setting: dict[str, int], res: dict[str, Any],
              cfg: Any, roofline: float | None) -> dict[str, Any]:
    from fedjax_lm.bench.workload import Workload, train_flops_per_token

    name = setting_label(setting)
    row = {**_cell_base(group, None, c), "label": f"peer:{peer}", "backend": f"peer:{peer}",
           "peer_setting": name, "dtype": "float32", "compiles": None, "peer_result": res,
           "status": res["status"]}
    tag = f"peer:{peer}" + (f" [{name}]" if name else "")
    if res["status"] == "ok":
        w = Workload(group.model, c, group.local_steps, group.batch_size, group.max_length)
        flops = train_flops_per_token(cfg, group.max_length) * w.tokens_per_round
        row.update(round_s=res["round_s"], first_round_s=res["first_round_s"],
                   round_times_s=res["round_times_s"],
                   compile_s=max(res["first_round_s"] - res["round_s"], 0.0),
                   examples_per_s=w.examples_per_round / res["round_s"],
                   tokens_per_s=w.tokens_per_round / res["round_s"],
                   flops_per_round=flops, flops_per_s=flops / res["round_s"],
                   roofline_flops_per_s=roofline,
                   roofline_fraction=flops / res["round_s"] / roofline if roofline else None,
                   peak_mem_bytes=res.get("peak_mem_bytes"), peak_mem_kind="peer_rss",
                   loadavg=res.get("loadavg"))
        print(f"[bench] {group.model} {tag} C={c} round {res['round_s']:.3f}s", flush=True)
    else:
        row.update(error=res.get("error"), stderr_tail=res.get("stderr_tail", ""))
        print(f"[bench] {group.model} {tag} C={c}: FAILED {res.get('error')}", flush=True)
    return row


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_loop = loop round_s / ours; peer_round_ratio[peer] = ours / theirs, against
    the peer's fastest setting in the cell."""
    ok = [r for r in rows if r.get("status") == "ok"]
    loop = {(r["model"], r["clients"]): r["round_s"] for r in ok if r["label"] == "loop"}
    peer: dict[tuple[str, int, str], float] = {}
    for r in ok:
        if r["label"].startswith("peer:"):
            key = (r["model"], r["clients"], r["label"][5:])
            peer[key] = min(peer.get(key, float("inf")), r["round_s"])
    for r in ok:
        key = (r["model"], r["clients"])
        if key in loop:
            r["speedup_vs_loop"] = loop[key] / r["round_s"]
        if not r["label"].startswith("peer:"):
            r["peer_round_ratio"] = {p: r["round_s"] / t for (m, c, p), t in peer.items()
                                     if (m, c) == key}


def main(argv: list[str] | None = None) -> int:
    """`python -m fedjax_lm.bench ARGS`: `fedjax-lm bench ARGS`, bad input one line (exit 2)."""
    from fedjax_lm.grid import ConfigError

    parser = argparse.ArgumentParser(prog="python -m fedjax_lm.bench", description=__doc__)
    add_arguments(parser)
    try:
        return run_bench(parser.parse_args(argv))
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
