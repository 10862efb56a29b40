"""nanochat master's optimizer options (optim.* settings, all off by default) against float64 NumPy references
written from master's formulas (nanochat/optim.py and scripts/base_train.py at 92d63d4) on torch's (out, in)
layout: Polar Express, MuonEq, Muon+, NorMuon, cautious weight decay, per-group AdamW, the schedules, the
depth scaling, the grouping rule, and 8 devices = 1 with everything on."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax.config import Config, ConfigError, OptimConfig, TrainConfig
from nanochat_jax.optim import (NorMuonState, build_optimizer, depth_scaling, lr_multiplier, muon_momentum,
                                muon_weight_decay, newton_schulz, param_labels, scaling_param_count)

C, V, L = 32, 128, 2  # toy width, vocab, layers (width and vocab divisible by the 8-device mesh)
NUM_ITERATIONS = 4
# master's constants where they fit 4 steps: lr multipliers 1, 1, 1, 0.525; momenta 0.85, 0.91, 0.97, 0.935
BASE = OptimConfig(ns_dtype="float32", grad_clip=0.0, warmup_steps=1, warmdown_ratio=0.5, final_lr_frac=0.05,
                   muon_momentum_start=0.85, muon_momentum=0.97, muon_momentum_warmup_steps=2,
                   muon_momentum_final=0.9, embedding_lr=0.3, unembedding_lr=0.008,
                   adam_embedding="0.8,0.995,1e-10,0.001", adam_unembedding="0.8,0.96,1e-10,0.01",
                   adam_value_embedding="0.8,0.995,1e-10,0.01", adam_resid_lambdas="0.8,0.95,1e-10,0.05",
                   adam_x0_lambdas="0.96,0.95,1e-10,0.0", adam_scalar="0.8,0.95,1e-10,0.0")
OPTIONS = {
    "newton_schulz": {},
    "polar_express": dict(orthogonalizer="polar_express"),
    "muon_eq": dict(muon_eq=True),
    "muon_plus": dict(muon_plus=True),
    "normuon": dict(normuon=True),
    "cautious_cosine_wd": dict(muon_weight_decay=0.2, muon_weight_decay_schedule="cosine", cautious_weight_decay=True),
    "all": dict(orthogonalizer="polar_express", muon_eq=True, muon_plus=True, normuon=True, muon_weight_decay=0.2,
                muon_weight_decay_schedule="cosine", cautious_weight_decay=True),
}
PE = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def modern_tree(seed, scale=1.0, layers=L):
    """A params-shaped dict with master's extra parameters; kernels stored (in, out)."""
    rng = np.random.default_rng(seed)

    def mat(*shape):
        return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

    def block(i):
        attn = {name: {"kernel": mat(C, C)} for name in ("c_q", "c_k", "c_v", "c_proj")}
        if i == layers - 1:
            attn["ve_gate"] = {"kernel": mat(4, 2)}  # (channels, kv heads): a matrix of the blocks, so Muon
        return {"attn": attn, "mlp": {"c_fc": {"kernel": mat(C, 4 * C)}, "c_proj": {"kernel": mat(4 * C, C)}}}

    return {"wte": {"embedding": mat(V, C)}, "lm_head": {"kernel": mat(C, V)},
            "blocks": {i: block(i) for i in range(layers)}, "value_embeds": {layers - 1: {"embedding": mat(V, C)}},
            "resid_lambdas": mat(layers), "x0_lambdas": mat(layers), "smear_gate": {"kernel": mat(8, 1)},
            "smear_lambda": mat(1), "backout_lambda": mat(1)}


# ---------------------------------------------------------------------------------------------
# Float64 references of master's formulas


def ref_lrm(it, n, warmup, warmdown_ratio, final):
    warmdown = round(warmdown_ratio * n)
    if it < warmup:
        return (it + 1) / warmup
    if it <= n - warmdown:
        return 1.0
    progress = (n - it) / warmdown
    return progress + (1 - progress) * final


def ref_momentum(it, n, warmup, start, mid, final, warmdown_ratio):
    warmdown = round(warmdown_ratio * n)
    if it < warmup:
        return (1 - it / warmup) * start + it / warmup * mid
    if it >= n - warmdown:
        progress = (it - (n - warmdown)) / warmdown
        return mid * (1 - progress) + final * progress
    return mid


def ref_weight_decay(it, n, wd):
    return wd * 0.5 * (1 + math.cos(math.pi * it / n))


def ref_orthogonalise(G, coeffs, norm_scale, eps):
    """master's muon_step_fused orthogonalisation, tall branch included (no transposition)."""
    X = G / (np.linalg.norm(G) * norm_scale + eps)
    for a, b, c in coeffs:
        if G.shape[0] > G.shape[1]:
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    return X


def ref_muon(p, g, buf, v, lr, mom, wd, cfg):
    """One master Muon step on torch-layout float64 arrays, in place; returns the new second moment."""
    buf += (1 - mom) * (g - buf)
    X = g + mom * (buf - g)
    if cfg.muon_eq:
        X = X * (np.linalg.norm(X) / X.shape[0] ** 0.5) / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-6)
    if cfg.orthogonalizer == "polar_express":
        X = ref_orthogonalise(X, PE, 1.01, 1e-6)
    else:
        X = ref_orthogonalise(X, [(3.4445, -4.7750, 2.0315)] * 5, 1.0, 1e-7)
    if cfg.muon_plus:
        X = X * min(X.shape) ** 0.5 / max(np.linalg.norm(X), 1e-6)
    if cfg.normuon:
        red = 1 if X.shape[0] >= X.shape[1] else 0
        v_mean = (X ** 2).mean(axis=red, keepdims=True)
        v_norm = np.sqrt(v_mean.sum() * X.shape[red])
        v = v + (1 - cfg.normuon_beta2) * (v_mean - v)
        step = 1 / np.sqrt(np.maximum(v, 1e-10))
        v_norm_new = np.sqrt((v_mean * X.shape[red] * step ** 2).sum())
        X = X * step * (v_norm / max(v_norm_new, 1e-10))
    lr = lr * max(1.0, X.shape[0] / X.shape[1]) ** 0.5
    mask = (X * p >= 0) if cfg.cautious_weight_decay else 1.0
    p -= lr * X + lr * wd * p * mask
    return v


class RefModern:
    """master's MuonAdamW on float64 copies, 2-D parameters in torch's (out, in) layout."""

    def __init__(self, params, cfg, n):
        self.cfg, self.n, self.step = cfg, n, 0
        leaves, self.treedef = jax.tree.flatten(params)
        self.labels = jax.tree.leaves(param_labels(params))
        self.p = [np.asarray(x, np.float64).T for x in leaves]
        self.m = [np.zeros_like(x) for x in self.p]
        self.v = [np.zeros_like(x) if lab != "muon" else 0.0 for x, lab in zip(self.p, self.labels)]
        scale = (C / 768) ** -0.5
        self.lrs = {"embedding": cfg.embedding_lr * scale, "unembedding": cfg.unembedding_lr * scale,
                    "value_embedding": cfg.value_embedding_lr * scale, "resid_lambdas": cfg.resid_lambdas_lr,
                    "x0_lambdas": cfg.x0_lambdas_lr, "scalar": cfg.scalar_lr, "muon": cfg.matrix_lr}

    def update(self, grads):
        cfg, it, t = self.cfg, self.step, self.step + 1
        g = [np.asarray(x, np.float64).T for x in jax.tree.leaves(grads)]
        lrm = ref_lrm(it, self.n, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
        mom = ref_momentum(it, self.n, cfg.muon_momentum_warmup_steps, cfg.muon_momentum_start, cfg.muon_momentum,
                           cfg.muon_momentum_final, cfg.warmdown_ratio)
        wd = ref_weight_decay(it, self.n, cfg.muon_weight_decay)
        for i, label in enumerate(self.labels):
            lr = self.lrs[label] * lrm
            if label == "muon":
                self.v[i] = ref_muon(self.p[i], g[i], self.m[i], self.v[i], lr, mom, wd, cfg)
                continue
            b1, b2, eps, group_wd = (float(x) for x in getattr(cfg, f"adam_{label}").split(","))
            self.p[i] *= 1 - lr * group_wd
            self.m[i] += (1 - b1) * (g[i] - self.m[i])
            self.v[i] += (1 - b2) * (g[i] ** 2 - self.v[i])
            self.p[i] -= lr / (1 - b1 ** t) * self.m[i] / (np.sqrt(self.v[i] / (1 - b2 ** t)) + eps)
        self.step += 1

    def params(self):
        return jax.tree.unflatten(self.treedef, [x.T for x in self.p])


def run_steps(opt, params, grads_list):
    state = opt.init(params)
    update = jax.jit(opt.update)
    for grads in grads_list:
        updates, state = update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, state


def max_rel_err(ours, ref, muon: bool):
    """Max over the Muon (or the other) leaves of max |ours - ref| / max |ref|."""
    labels = jax.tree.leaves(param_labels(ref))
    return max(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()
               for a, b, lab in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), labels) if (lab == "muon") == muon)


# ---------------------------------------------------------------------------------------------
# Orthogonalisation, schedules, groups


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_polar_express_matches_master_iteration(shape):
    G = np.random.default_rng(0).normal(size=shape)
    ref = ref_orthogonalise(G, PE, 1.01, 1e-6)
    ours = newton_schulz(jnp.asarray(G, jnp.float32), dtype=jnp.float32, method="polar_express")
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, atol=1e-5)
    bf16 = np.asarray(newton_schulz(jnp.asarray(G, jnp.float32), method="polar_express"), np.float64)
    assert np.linalg.norm(bf16 - ref) / np.linalg.norm(ref) < 0.05
    three = newton_schulz(jnp.asarray(G, jnp.float32), 3, jnp.float32, "polar_express")  # the first 3 triples
    np.testing.assert_allclose(np.asarray(three, np.float64), ref_orthogonalise(G, PE[:3], 1.01, 1e-6), atol=1e-5)


def test_schedules_match_master_base_train():
    """warmup 40 steps, warm-down 65% to 0.05; momentum 0.85 -> 0.97 over 400 steps, -> 0.90 over the
    warm-down; weight decay 0.28 cosine to 0 (master's defaults), at every step of a 1000-step run."""
    cfg = OptimConfig(warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05, muon_momentum_start=0.85,
                      muon_momentum=0.97, muon_momentum_warmup_steps=400, muon_momentum_final=0.9,
                      muon_weight_decay=0.28, muon_weight_decay_schedule="cosine")
    n, steps = 1000, jnp.arange(1000)
    np.testing.assert_allclose(jax.jit(lambda s: lr_multiplier(s, n, cfg))(steps),
                               [ref_lrm(i, n, 40, 0.65, 0.05) for i in range(n)], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda s: muon_momentum(s, cfg, n))(steps),
                               [ref_momentum(i, n, 400, 0.85, 0.97, 0.9, 0.65) for i in range(n)], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda s: muon_weight_decay(s, n, cfg))(steps),
                               [ref_weight_decay(i, n, 0.28) for i in range(n)], rtol=1e-5, atol=1e-7)
    assert float(muon_momentum(675, cfg, n)) == pytest.approx(0.935, rel=1e-6)  # halfway down the 650 steps
    assert float(muon_weight_decay(500, n, OptimConfig(muon_weight_decay=0.1))) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="needs num_iterations"):
        muon_momentum(0, cfg)


def test_grouping_rule_by_name_and_shape():
    labels = param_labels(modern_tree(0))
    assert labels["value_embeds"][L - 1]["embedding"] == "value_embedding"
    assert labels["blocks"][L - 1]["attn"]["ve_gate"]["kernel"] == "muon"  # a matrix of the blocks, as master
    assert (labels["resid_lambdas"], labels["x0_lambdas"]) == ("resid_lambdas", "x0_lambdas")
    assert labels["smear_gate"]["kernel"] == labels["smear_lambda"] == labels["backout_lambda"] == "scalar"
    nested = param_labels({"blocks": {0: {"norm_gain": jnp.ones(C), "resid_lambda": jnp.ones(())}}})
    assert nested["blocks"][0] == {"norm_gain": "scalar", "resid_lambda": "resid_lambdas"}


def test_config_rejects_bad_option_values():
    for kwargs, message in [(dict(adam_scalar="0.8,0.95"), "optim.adam_scalar='0.8,0.95' is not"),
                            (dict(adam_scalar="0.8,1.5,1e-10,0"), "betas must be in"),
                            (dict(orthogonalizer="polar_express", ns_steps=6), "5 steps at most"),
                            (dict(orthogonalizer="svd"), "orthogonalizer"),
                            (dict(warmup_steps=10, warmup_ratio=0.1), "not both"),
                            (dict(muon_momentum_final=1.5), "muon_momentum_final")]:
        with pytest.raises(ConfigError, match=message):
            OptimConfig(**kwargs).validate()
    with pytest.raises(ConfigError, match="needs optim.reference_depth"):
        Config(train=TrainConfig(total_batch_size=-1)).validate()


# ---------------------------------------------------------------------------------------------
# Whole optimizer steps against the reference


def check_against_reference(cfg, params):
    trees = [modern_tree(10 + k, scale=0.3, layers=len(params["blocks"])) for k in range(NUM_ITERATIONS)]
    grads_list = [{name: tree[name] for name in params} for tree in trees]
    ref = RefModern(params, cfg, NUM_ITERATIONS)
    for grads in grads_list:
        ref.update(grads)
    ours, state = run_steps(build_optimizer(cfg, C, NUM_ITERATIONS), params, grads_list)
    # float32 against float64 through 4 steps; the cautious mask may flip where update x weight is ~0
    assert max_rel_err(ours, ref.params(), muon=True) < (2e-4 if cfg.cautious_weight_decay else 2e-5)
    return ours, state, ref


@pytest.mark.parametrize("option", [o for o in OPTIONS if o != "all"])
def test_each_muon_option_matches_master_reference(option):
    """One option at a time, on the matrices of one block (the Muon group alone)."""
    cfg = dataclasses.replace(BASE, **OPTIONS[option])
    _, state, _ = check_against_reference(cfg, {"blocks": modern_tree(0, scale=0.5, layers=1)["blocks"]})
    muon_state = state[-1].inner_states["muon"].inner_state
    assert isinstance(muon_state.inner_state, NorMuonState) == cfg.normuon
    assert ("weight_decay" in muon_state.hyperparams) == (cfg.muon_weight_decay > 0)


def test_all_options_and_adamw_groups_match_master_reference():
    """Everything on, with master's AdamW groups (value embeddings, resid / x0 lambdas, gates) and schedules."""
    ours, _, ref = check_against_reference(dataclasses.replace(BASE, **OPTIONS["all"]), modern_tree(0, scale=0.5))
    assert max_rel_err(ours, ref.params(), muon=False) < 1e-5


def test_defaults_keep_the_first_release_state():
    """Off by default: the first release's tree gets exactly its three groups and Muon's two-field state."""
    tree = {k: v for k, v in modern_tree(0).items() if k in ("wte", "lm_head", "blocks")}
    tree["blocks"][L - 1]["attn"].pop("ve_gate")
    state = build_optimizer(OptimConfig(), C, NUM_ITERATIONS).init(tree)
    assert sorted(state[-1].inner_states) == ["embedding", "muon", "unembedding"]
    muon_state = state[-1].inner_states["muon"].inner_state
    assert sorted(muon_state.hyperparams) == ["learning_rate", "momentum"]
    assert muon_state.inner_state._fields == ("count", "momentum_buffer")


def test_all_options_sharded_equal_single_device(make_mesh):
    mesh = make_mesh(1, 8, 1)

    def sharding(path, leaf):
        if leaf.ndim < 2 or min(leaf.shape) % 8:
            return NamedSharding(mesh, P())
        names = [getattr(k, "key", None) for k in path]
        return NamedSharding(mesh, P("fsdp", None) if "c_proj" in names or "lm_head" in names else P(None, "fsdp"))

    keep = ("blocks", "resid_lambdas", "smear_gate")  # Muon (stacked over the mesh) and replicated scalars
    params, *grads_list = [{k: modern_tree(seed, 0.5, layers=1)[k] for k in keep} for seed in (0, 10, 11)]
    shardings = jax.tree_util.tree_map_with_path(sharding, params)
    opt = build_optimizer(dataclasses.replace(BASE, **OPTIONS["all"]), C, NUM_ITERATIONS)
    single, _ = run_steps(opt, params, grads_list)
    with jax.set_mesh(mesh):  # as in the train step: the stacks are split over the devices (sharding.constrain)
        sharded, _ = run_steps(opt, jax.device_put(params, shardings),
                               [jax.device_put(g, shardings) for g in grads_list])
    assert sharded["blocks"][0]["mlp"]["c_fc"]["kernel"].sharding == shardings["blocks"][0]["mlp"]["c_fc"]["kernel"]
    chex.assert_trees_all_close(sharded, single, atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Depth scaling


def master_scaling_params(depth, vocab=32768):
    """master's transformer matrices + lm_head at aspect 64, head_dim 128, n_kv_head = n_head: 12 d^2 per layer,
    a (12 x n_head) value-embedding gate on every other layer (the last included), vocab x d."""
    d = 64 * depth
    ve_layers = sum(i % 2 == (depth - 1) % 2 for i in range(depth))
    return depth * 12 * d * d + ve_layers * 12 * (d // 128) + vocab * d


@pytest.mark.parametrize("depth, ratio, params, batch, weight_decay, steps", [
    # worked by hand from master's base_train: D = ratio x params, D_ref = ratio x 110,100,912 (d12),
    # B = 2^round(log2(2^19 (D / D_ref)^0.383)), lr x sqrt(B / 2^19), wd = 0.28 sqrt(B / 2^19) D_ref / D, D // B
    (20, 12.0, 435_160_240, 1_048_576, 0.10018777642556008, 4980),
    (24, 8.0, 729_810_624, 1_048_576, 0.05973842446340308, 5568),  # the speedrun (runs/speedrun.sh)
    (12, 12.0, 110_100_912, 524_288, 0.28, 2520),
])
def test_depth_scaling_matches_master(depth, ratio, params, batch, weight_decay, steps):
    assert master_scaling_params(depth) == params and master_scaling_params(12) == 110_100_912
    cfg = OptimConfig(reference_depth=12, embedding_lr=0.3, unembedding_lr=0.008, muon_weight_decay=0.28)
    out = depth_scaling(cfg, TrainConfig(total_batch_size=-1, target_param_data_ratio=ratio), params, 110_100_912)
    assert out.total_batch_size == batch and out.target_tokens // batch == steps
    scale = (batch / 2 ** 19) ** 0.5
    assert out.lr_scale == pytest.approx(scale, rel=1e-12)
    assert out.optim.muon_weight_decay == pytest.approx(weight_decay, rel=1e-12)
    assert out.optim.matrix_lr == pytest.approx(0.02 * scale) and out.optim.embedding_lr == pytest.approx(0.3 * scale)
    assert out.optim.x0_lambdas_lr == pytest.approx(0.5 * scale) and out.optim.scalar_lr == cfg.scalar_lr
    fixed = depth_scaling(cfg, TrainConfig(total_batch_size=2 ** 19, target_param_data_ratio=ratio), params,
                          110_100_912)  # a given batch is kept; weight decay still follows D_ref / D
    assert fixed.total_batch_size == 2 ** 19 and fixed.optim.matrix_lr == 0.02
    assert fixed.optim.muon_weight_decay == pytest.approx(0.28 * 110_100_912 / params, rel=1e-6)


def test_scaling_param_count_is_blocks_and_lm_head():
    tree = modern_tree(0)
    expected = sum(x.size for x in jax.tree.leaves(tree["blocks"])) + C * V
    assert scaling_param_count(jax.eval_shape(lambda: tree)) == expected
