"""`fedjax-lm sweep --vectorize`: sweep cells that differ only in seed, learning rates, client
count or partition train as ONE compiled program with a leading federation axis
(`federated.federations`), each cell still in its own run directory (`bookkeeping.RunBook`:
config, metrics, checkpoints, final.json, resume).

Planning, one printed line per program or lone cell:
1. a cell whose features the federation axis does not carry (DP, robust aggregators, attacks,
   per-client LoRA ranks, carried client state, Poisson sampling, other backends) runs alone;
   parameter-efficient cells (LoRA of one rank, head-only, BitFit, frozen layers) share
   programs: their trainable mask and aggregation are the same for every cell of a program;
2. the rest are grouped by everything but `VARYING` (and where they write); within a group,
   cells of different client counts / local steps share a program while the padded work stays
   within `padding` × the real work (paper 1's sweep at one epoch has C × S constant, so
   padding C = 1 to C = 32 would compute 32× more: those stay separate programs);
3. a program is compiled before it runs; if XLA's peak exceeds the memory budget, the largest
   group that fits is named and the program split into groups of that size.
Programs compile ahead on a host thread (`CompileAhead`), the next one while the main thread
trains the current: on a CPU a compile keeps one core while the rounds run, and on an
accelerator the host compiles while the device computes. Planning keeps only the shapes of
each cell's initial parameters; a group loads its weights when it runs, so a long sweep's
queued cells do not each hold a model in memory, and leaves equal in every cell (a pretrained
base) are then held once. Parameter-efficient cells share their frozen base inside the program
too (`FederationRound(shared=...)`): planned from the config (`planned_shared`), checked
against the loaded values before the first round.
A group whose cells stopped at different rounds first runs the lagging cells alone up to the
furthest one, then continues together; every cell's numbers equal its run alone (to float
tolerance: summation over a padded client axis may reorder).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from fedjax_lm import federated as fl
from fedjax_lm.federated.federations import (
    FederationRound,
    common_leaves,
    compiled_bytes,
    join_shared,
    split_shared,
    stack,
    unstack,
)
from fedjax_lm.federated.trainable import Trainable, mask_from_predicate
from fedjax_lm.models.peft import drawn_from_seed
from fedjax_lm.models.pretrained import PRESET_PREFIX
from fedjax_lm.runner import peft, privacy
from fedjax_lm.runner.bookkeeping import RunBook
from fedjax_lm.runner.config import EXECUTION_FIELDS, RunConfig
from fedjax_lm.runner.experiment import (
    Experiment,
    Hypers,
    build_algorithm,
    build_experiment,
    hypers,
    load_model,
    round_data,
)
from fedjax_lm.runner.presets import VectorizeOptions
from fedjax_lm.runner.rundir import checkpointed_round, locked
from fedjax_lm.runner.train import make_predict, train
from fedjax_lm.scale.memory import format_bytes

# What may differ between the federations of one program: traced (learning rates), padded
# (client counts; a partition's per-client step counts under local_epochs) or only in the data
# each federation's cohorts carry (seed, partition and its parameters).
VARYING = ("seed", "lr", "server_lr", "clients", "cohort_size", "partition", "alpha", "p", "k",
           "beta")
# Execution fields each cell keeps to itself (the others shape the program).
PER_CELL = EXECUTION_FIELDS - {"backend", "clients_per_chunk", "chunk_executor"}

RunAlone = Callable[[RunConfig], dict]


@dataclasses.dataclass
class Group:
    """Cells run as one program (`exps` built, their params as shapes until the group runs:
    `with_weights`), or one cell run alone (`exps` None)."""

    cells: list[RunConfig]
    line: str  # what is printed about it
    exps: list[Experiment] | None = None

    @property
    def names(self) -> str:
        return _names([Path(c.out).name for c in self.cells])

    def with_weights(self) -> Group:
        """This group with every cell's initial params loaded (`without_weights` undone), a
        leaf equal in every cell held once."""
        exps = [_with_weights(e) for e in self.exps]
        if all(a is b for a, b in zip(exps, self.exps, strict=True)):
            return self  # loaded already
        return Group(self.cells, self.line, _one_copy(exps))


def _one_copy(exps: list[Experiment]) -> list[Experiment]:
    """The cells' params with each leaf that is equal in all of them taken from the first."""
    params = [e.params for e in exps]
    same = common_leaves(params, jax.tree.map(lambda _: True, params[0]))
    return [dataclasses.replace(e, params=jax.tree.map(
        lambda eq, first, x: first if eq else x, same, params[0], e.params)) for e in exps]


def without_weights(exp: Experiment) -> Experiment:
    """`exp` holding only its params' shapes: what planning and compiling need."""
    return dataclasses.replace(exp, params=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.params))


def _with_weights(exp: Experiment) -> Experiment:
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(exp.params)):
        return exp
    _, params, _ = load_model(exp.cfg, exp.num_classes)  # as build_experiment: same numbers
    if jax.tree.map(lambda x: (x.shape, x.dtype), params) != jax.tree.map(
            lambda x: (x.shape, x.dtype), exp.params):
        raise RuntimeError(f"{exp.cfg.out}: the model loaded for training does not have the "
                           "shapes it was planned with (did the checkpoint change meanwhile?)")
    return dataclasses.replace(exp, params=params)


def not_vectorized(cfg: RunConfig) -> str | None:
    """What of this cell the federation axis does not carry, or None."""
    checks = (
        (cfg.backend != "vmap" or cfg.chunk_executor != "scan",
         f"backend={cfg.backend}, chunk_executor={cfg.chunk_executor} (a vectorized program "
         "is one vmap/scan program on one device)"),
        (privacy.dp_enabled(cfg), "DP-FedAvg (dp_clip)"),
        (cfg.sampling != "fixed", f"sampling={cfg.sampling}"),
        (cfg.aggregator != "mean", f"aggregator={cfg.aggregator}"),
        (cfg.attack is not None, f"attack={cfg.attack}"),
        (cfg.peft == "lora" and peft.rank_spec(cfg) is not None,
         "per-client LoRA ranks (lora_ranks)"),
        (cfg.algorithm == "scaffold" or cfg.carry_client_state,
         "carried client state (scaffold, carry_client_state)"),
    )
    return next((why for bad, why in checks if bad), None)


def program_key(cfg: RunConfig) -> tuple:
    """Cells with equal keys can share a program. Plain FedAvg's server_lr decides whether a
    server optimizer exists at all, so there it is part of the program."""
    varying = set(VARYING) - ({"server_lr"} if cfg.server_optimizer == "fedavg" else set())
    d = cfg.to_dict()
    return tuple(sorted((k, str(v)) for k, v in d.items() if k not in varying | PER_CELL))


def _work(cfg: RunConfig, exp: Experiment) -> tuple[int, int]:
    """(clients a round, local steps) of one cell."""
    return cfg.cohort_size or cfg.clients, exp.steps_per_round


def split_by_padding(cells: list[RunConfig], exps: list[Experiment], limit: float
                     ) -> list[list[int]]:
    """Indices of the cells per program: cells of one shape always together, the next shape
    (largest first) joins while padded work <= `limit` × real work."""
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, (cfg, exp) in enumerate(zip(cells, exps, strict=True)):
        shapes.setdefault(_work(cfg, exp), []).append(i)
    groups: list[list[int]] = []
    current: list[int] = []
    for shape in sorted(shapes, reverse=True):
        trial = current + shapes[shape]
        works = [_work(cells[i], exps[i]) for i in trial]
        padded = len(trial) * max(c for c, _ in works) * max(s for _, s in works)
        if current and padded > limit * sum(c * s for c, s in works):
            groups.append(current)
            trial = shapes[shape]
        current = trial
    return groups + [current]


def plan(cells: list[RunConfig], options: VectorizeOptions) -> tuple[list[Group], list[str]]:
    """The programs and lone cells of a sweep (in the order of their first cell), and the
    warnings: one line per reason a cell cannot share a program."""
    groups: list[Group] = []
    unsupported: dict[str, list[str]] = {}
    by_key: dict[tuple, list[RunConfig]] = {}
    for cfg in cells:
        if why := not_vectorized(cfg):
            groups.append(Group([cfg], ""))
            unsupported.setdefault(why, []).append(Path(cfg.out).name)
        else:
            by_key.setdefault(program_key(cfg), []).append(cfg)
    warnings = [f"{_names(names)} run(s) alone: {why} is not vectorized"
                for why, names in unsupported.items()]
    alone = [members[0] for members in by_key.values() if len(members) == 1]
    if alone:
        differ = sorted({f for k in by_key for f, v in k
                         if any(dict(o).get(f) != v for o in by_key if o != k)})
        why = (f"they differ in {', '.join(differ)}, beyond {', '.join(VARYING)}"
               if differ else "no other cell to share a program with")
        warnings.append(f"{_names([Path(c.out).name for c in alone])} run(s) alone, each its "
                        f"own program: {why}")
        groups += [Group([cfg], "") for cfg in alone]
    for members in (m for m in by_key.values() if len(m) > 1):
        exps = [without_weights(build_experiment(cfg)) for cfg in members]
        parts = split_by_padding(members, exps, options.padding)
        for part in parts:
            group = Group([members[i] for i in part], "", [exps[i] for i in part])
            clients = max(_work(c, e)[0] for c, e in zip(group.cells, group.exps, strict=True))
            steps = max(e.steps_per_round for e in group.exps)
            note = (f" (not padded together with the other {len(members) - len(part)}: that "
                    f"would exceed {options.padding:g}x the real work)" if len(parts) > 1 else "")
            group.line = (f"{len(part)} cell(s) as one program, padded to {clients} clients x "
                          f"{steps} local steps: {group.names}{note}")
            groups.append(group)
    order = {c.out: i for i, c in enumerate(cells)}
    return sorted(groups, key=lambda g: order[g.cells[0].out]), warnings


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{len(names)} cells ({names[0]}, ...)"


def memory_budget(options: VectorizeOptions) -> int:
    """Bytes one program may take: the option, 90% of an accelerator's, or half the host's
    available RAM (a CPU host is shared with everything else running)."""
    if options.memory:
        return options.memory
    stats = jax.devices()[0].memory_stats() or {}
    if limit := stats.get("bytes_limit"):
        return int(0.9 * limit)
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024 // 2


def say(line: str) -> None:
    """What runs as one program (stdout)."""
    tqdm.write(f"vectorize: {line}")


def warn(line: str) -> None:
    """What could not run as planned (stderr, one line each)."""
    tqdm.write(f"warning: vectorize: {line}", file=sys.stderr)


def run_vectorized(cells: list[RunConfig], options: VectorizeOptions, *, run_alone: RunAlone,
                   progress: bool = True) -> list[dict]:
    """Every (unfinished) cell, as planned; results in cell order."""
    results: dict[str, dict] = {}
    groups, warnings = plan(cells, options)
    for line in warnings:
        warn(line)
    programs = [g for g in groups if len(g.cells) > 1]
    with CompileAhead(programs) as ahead:
        for group in groups:
            if group.line:
                say(group.line)
            if len(group.cells) == 1:
                cfg = group.cells[0]
                results[cfg.out] = (train(cfg, progress=progress,
                                          exp=_with_weights(group.exps[0]))
                                    if group.exps else run_alone(cfg))
                continue
            ahead.reach(programs.index(group))
            finals = run_group(group, options, progress, ahead)
            for cfg, final in zip(group.cells, finals, strict=True):
                results[cfg.out] = final
    return [results[c.out] for c in cells]


@dataclasses.dataclass
class Compiled:
    """A group's program, compiled for its shapes (nothing has run), and XLA's peak bytes."""

    program: FederationRound
    hp: Hypers
    steps: int
    need: int


def compile_group(group: Group) -> Compiled:
    """Compiled for round 0's cohorts: every round's have the same shapes (padded to `steps`)."""
    program = _program(group)
    own, common = jax.eval_shape(
        lambda ps: split_shared(program.shared, _initial_states(group, ps)),
        [e.params for e in group.exps])
    hp = stack([hypers(c) for c in group.cells])
    steps = max(e.steps_per_round for e in group.exps)
    blocks = program.place(_cohorts(group, 0)[1], steps)
    return Compiled(program, hp, steps,
                    compiled_bytes(program.compile(own, blocks, hp, common)))


class CompileAhead:
    """Compiles the groups' programs in order on one daemon thread, started at once, at most
    `lookahead` groups past the one the caller `reach`ed (a compiled program holds memory until
    it runs); `take` waits for a group's. A group whose cells changed before it ran (some
    resumed alone) is compiled again by the caller. Leaving the context abandons the compiles
    not yet started."""

    def __init__(self, groups: list[Group], lookahead: int = 1):
        self._futures: dict[tuple[str, ...], concurrent.futures.Future] = {
            _cells_key(g): concurrent.futures.Future() for g in groups}
        self._planned = dict(self._futures)  # the worker's view: `take` pops `_futures`
        self._groups = groups
        self._index = {_cells_key(g): i for i, g in enumerate(groups)}
        self._lookahead = lookahead
        self._reached = 0
        self._moved = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="compile-ahead", daemon=True)

    def reach(self, index: int) -> None:
        """The caller is at group `index`: groups up to `index + lookahead` may compile."""
        with self._moved:
            self._reached = max(self._reached, index)
            self._moved.notify_all()

    def _work(self) -> None:
        for i, group in enumerate(self._groups):
            with self._moved:
                self._moved.wait_for(
                    lambda i=i: self._stop.is_set() or i <= self._reached + self._lookahead)
            future = self._planned[_cells_key(group)]
            if self._stop.is_set() or not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(compile_group(group))
            except BaseException as e:  # raised where the main thread takes it
                future.set_exception(e)

    def take(self, group: Group) -> Compiled:
        if (index := self._index.get(_cells_key(group))) is not None:
            self.reach(index)
        future = self._futures.pop(_cells_key(group), None)
        return compile_group(group) if future is None else future.result()

    def __enter__(self) -> CompileAhead:
        if self._groups:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with self._moved:
            self._moved.notify_all()
        for future in self._futures.values():
            future.cancel()


def _cells_key(group: Group) -> tuple[str, ...]:
    return tuple(c.out for c in group.cells)


def run_group(group: Group, options: VectorizeOptions, progress: bool,
              ahead: CompileAhead | None = None) -> list[dict]:
    """Bring the cells to the same round, fit the program in memory, then train together."""
    group = group.with_weights()
    finals: dict[str, dict] = {}
    cells, exps = group.cells, group.exps
    done = [checkpointed_round(Path(c.out)) or 0 for c in cells]
    target = max((d for c, d in zip(cells, done, strict=True) if d < c.rounds), default=0)
    for i, cfg in enumerate(cells):
        if done[i] >= cfg.rounds:  # checkpointed to the end: only final.json is missing
            finals[cfg.out] = train(cfg, progress=progress, exp=exps[i])
        elif done[i] < target:
            say(f"cell {Path(cfg.out).name} is at round {done[i]}, its group at {target}: "
                f"running it alone to round {target}")
            train(cfg.replace(rounds=target), progress=progress, exp=exps[i])
    todo = [i for i, c in enumerate(cells) if c.out not in finals]
    if len(todo) == 1:
        finals[cells[todo[0]].out] = train(cells[todo[0]], progress=progress, exp=exps[todo[0]])
    elif todo:
        sub = Group([cells[i] for i in todo], group.line, [exps[i] for i in todo])
        compiled = ahead.take(sub) if ahead else compile_group(sub)
        for cfg, final in zip(sub.cells, _fit_and_train(sub, compiled, options, progress),
                              strict=True):
            finals[cfg.out] = final
    return [finals[c.out] for c in cells]


def _program(group: Group) -> FederationRound:
    """The group's program, its frozen base shared as planned."""
    cfg, exp = group.cells[0], group.exps[0]  # equal but for VARYING: one algorithm of hypers
    return FederationRound(lambda hp: build_algorithm(cfg, exp, hp), cfg.clients_per_chunk,
                           shared=planned_shared(group))


def planned_shared(group: Group) -> Trainable | None:
    """The frozen leaves the group's federations should hold once: all of them when the cells
    share a seed; otherwise, for a pretrained model, those loaded rather than drawn from the
    seed (`drawn_from_seed`: FFA-LoRA's frozen A is). None: nothing to share."""
    mask = group.exps[0].peft.trainable
    one_seed = len({c.seed for c in group.cells}) == 1
    seeded_base = group.cells[0].model.startswith(PRESET_PREFIX)  # every weight from the seed
    if mask is None or (seeded_base and not one_seed):
        return None
    loaded = mask_from_predicate(mask, lambda path: not drawn_from_seed(path))
    shared = jax.tree.map(lambda trains, kept: not trains and (one_seed or kept), mask, loaded)
    return shared if any(jax.tree.leaves(shared)) else None


def _checked(program: FederationRound, group: Group, states: list[fl.ServerState]
             ) -> FederationRound:
    """`program`, or one sharing fewer leaves if the loaded values say the plan was wrong."""
    if program.shared is None:
        return program
    actual = common_leaves([s.params for s in states], program.shared)
    if jax.tree.leaves(actual) == jax.tree.leaves(program.shared):
        return program
    say(f"{group.names}: some frozen leaves differ between the cells; compiling again with "
        "those held per cell")
    return FederationRound(program.algorithm_fn, program.clients_per_chunk,
                           shared=actual if any(jax.tree.leaves(actual)) else None)


def _cohorts(group: Group, r: int) -> tuple[list[privacy.RoundCohort], list[fl.Cohort]]:
    drawn, cohorts = [], []
    for cfg, exp in zip(group.cells, group.exps, strict=True):
        rc = privacy.draw_cohort(cfg, jax.random.key(cfg.seed), r)
        data = rc.zero_padding(round_data(cfg, exp, r, rc.ids))
        drawn.append(rc)
        cohorts.append(fl.make_cohort(data, rc.ids, weighting=cfg.weighting))
    return drawn, cohorts


def _initial_states(group: Group, params: list | None = None) -> list[fl.ServerState]:
    """Each cell's round-0 server state (`params`: the cells' initial params, traced when
    compiling; default the loaded ones). Trainable leaves are copied (the program donates
    them); frozen ones are the loaded arrays, one copy when the cells share them."""
    states = []
    params = [e.params for e in group.exps] if params is None else params
    mask = group.exps[0].peft.trainable
    for cfg, exp, p in zip(group.cells, group.exps, params, strict=True):
        algorithm = build_algorithm(cfg, exp)
        trains = jax.tree.map(lambda _: True, p) if mask is None else mask
        p = jax.tree.map(lambda t, x: jnp.array(x, copy=True) if t else x, trains, p)
        states.append(fl.init_state(algorithm, p, jax.random.key(cfg.seed)))
    return states


def _fit_and_train(group: Group, compiled: Compiled, options: VectorizeOptions,
                   progress: bool) -> list[dict]:
    """Train the group with its compiled program, or split the group if it does not fit."""
    need, steps = compiled.need, compiled.steps
    budget = memory_budget(options)
    if need <= budget:
        return _train_group(group, compiled.program, compiled.hp, steps, progress)
    per = need / len(group.cells)
    fit = int(budget // per)
    action = (f"splitting it into groups of {fit}" if fit >= 2
              else "running its cells one by one")
    warn(f"the program of {len(group.cells)} cells ({group.names}) needs {format_bytes(need)}, "
        f"over the {format_bytes(budget)} budget (vectorize memory); the largest group that "
        f"fits is {fit} cell(s) (~{format_bytes(per)} each): {action}")
    if fit < 2:
        return [train(c, progress=progress, exp=e)
                for c, e in zip(group.cells, group.exps, strict=True)]
    finals = []
    for i in range(0, len(group.cells), fit):
        part = Group(group.cells[i:i + fit], group.line, group.exps[i:i + fit])
        if len(part.cells) == 1:
            finals.append(train(part.cells[0], progress=progress, exp=part.exps[0]))
        else:
            finals += _train_group(part, _program(part), stack([hypers(c) for c in part.cells]),
                                   steps, progress)
    return finals


def _train_group(group: Group, program: FederationRound, hp, steps: int,
                 progress: bool) -> list[dict]:
    """The rounds of every cell as one program; each cell's own directory holds its run."""
    cells, exps = group.cells, group.exps
    rounds = cells[0].rounds
    with contextlib.ExitStack() as stack_:
        t_setup = time.perf_counter()
        for cfg in cells:
            stack_.enter_context(locked(Path(cfg.out)))
        predict = make_predict(exps[0].model)  # one model config: one compiled predict
        books = [RunBook(cfg, exp, state, None, predict=predict)
                 for cfg, exp, state in zip(cells, exps, _initial_states(group), strict=True)]
        for book in books:
            stack_.callback(book.close)
        start = books[0].start
        if any(b.start != start for b in books):  # another process moved a cell meanwhile
            raise RuntimeError("the cells of a vectorized group are at different rounds")
        program = _checked(program, group, [b.state for b in books])
        states, common = split_shared(program.shared, [b.state for b in books])
        setup_s = (time.perf_counter() - t_setup) / len(cells)
        bar = tqdm(range(start, rounds), initial=start, total=rounds, unit="round",
                   desc=f"{len(cells)} federations", disable=not progress, leave=False)
        for r in bar:
            t0 = time.perf_counter()
            drawn, cohorts = _cohorts(group, r)
            states, outputs = program(states, cohorts, hp, steps, common)
            jax.block_until_ready((states, outputs))  # else the first cell's record waits for
            per_cell = (time.perf_counter() - t0) / len(cells)  # the round and is charged it
            for book, rc, state, out in zip(books, drawn, unstack(states, len(cells)), outputs,
                                            strict=True):
                book.record(r, rc, join_shared(program.shared, state, common), out.metrics,
                            None, time.perf_counter() - per_cell)
        bar.close()
        for book in books:
            book.close()  # checkpoints committed before final.json says the run is done
        return [book.final(setup_s) for book in books]
