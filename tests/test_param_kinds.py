"""Every parameter kind through the one masked mechanism: attention in_proj (a torchvision
ViT), recurrent weights (LSTM, GRU), an Embedding, a custom module's raw nn.Parameter; the
contracts of tests/test_convert.py run over each of them, and the include/exclude choice."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call
from torchvision.models import VisionTransformer

import bnnconvert
from bnnconvert import bayes_summary, convert, mean_weights, to_deterministic
from bnnconvert.convert import num_bayesian
from bnnconvert.curvature import diagonal_ggn
from bnnconvert.layers import (
    DEFAULT_INCLUDE,
    BayesianLayer,
    bayesian_layers,
    bayesian_masks,
    convertible_parameters,
    parameter_kinds,
)
from bnnconvert.sampling import mc_outputs

cuda = pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")


# ------------------------------------------------------------------------ the models
def _vit() -> nn.Module:
    torch.manual_seed(3)
    model = VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=3,
    )  # fmt: skip
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at 0
    return model.eval()


class LSTMClassifier(nn.Module):
    """A sequence classifier: (N, T, 4) -> two LSTM layers -> the last step -> 3 classes."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class GRUClassifier(nn.Module):
    """A bidirectional GRU over (N, T, 4), mean over time."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0].mean(1))


class TextClassifier(nn.Module):
    """Token ids (N, T) -> Embedding -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8, padding_idx=0)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


class Scaled(nn.Module):
    """A custom module whose forward reads two raw parameters of its own."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.shift = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        return self.body(x) * self.scale + self.shift


def _seeded(cls):
    def make():
        torch.manual_seed(3)
        return cls().eval()

    return make


def _inputs(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return torch.randn(n, 3, 16, 16, generator=g)
    if kind == "sequence":
        return torch.randn(n, 5, 4, generator=g)
    if kind == "tokens":
        return torch.randint(1, 30, (n, 7), generator=g)
    return torch.randn(n, 6, generator=g)


# name: (factory, input kind, include, {module name: Bayesian tensors of a new kind})
CASES = {
    "vit": (
        _vit, "image", None,
        {"encoder.layers.encoder_layer_0.self_attention": {"in_proj_weight", "in_proj_bias"}},
    ),
    "lstm": (
        _seeded(LSTMClassifier), "sequence", None,
        {"rnn": {f"{w}_{g}_l{i}" for w in ("weight", "bias") for g in ("ih", "hh")
                 for i in (0, 1)}},
    ),
    "gru": (
        _seeded(GRUClassifier), "sequence", None,
        {"rnn": {f"{w}_{g}_l0{s}" for w in ("weight", "bias") for g in ("ih", "hh")
                 for s in ("", "_reverse")}},
    ),
    "embedding": (_seeded(TextClassifier), "tokens", None, {"embed": {"weight"}}),
    "raw": (_seeded(Scaled), "vector", ("linear", "other"), {"": {"scale", "shift"}}),
}  # fmt: skip


def _batches(case: str, n_batches: int = 2, n: int = 6):
    g = torch.Generator().manual_seed(7)
    kind = CASES[case][1]
    return [
        (_inputs(kind, n, seed), torch.randint(0, 3, (n,), generator=g))
        for seed in range(n_batches)
    ]


def _convert(case: str, r_bayes: float = 0.3):
    """(original, converted): grad2 saliency, the same fraction of every tensor."""
    make, _, include, _ = CASES[case]
    model = make()
    sal = bnnconvert.compute_saliency(model, _batches(case), include=include)
    return model, convert(model, sal, r_bayes, scope="layer")


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


# ------------------------------------------------------------------------ contracts
def test_new_kinds_are_scored_selected_and_kept_in_their_class(case):
    model, pbnn = _convert(case)
    expected = CASES[case][3]
    modules = dict(pbnn.named_modules())
    for name, tensors in expected.items():
        layer = modules[name]
        assert isinstance(layer, BayesianLayer), name
        assert isinstance(layer, type(dict(model.named_modules())[name]))
        assert tensors <= set(layer.bayes_names), (name, layer.bayes_names)
    masks = bayesian_masks(pbnn)
    for name, tensors in expected.items():
        for tensor in tensors:
            key = f"{name}.{tensor}" if name else tensor
            # scope "layer": round(0.3 n) entries of each tensor
            assert int(masks[key].sum()) == round(0.3 * masks[key].numel()), key


def test_state_dict_parameter_count_and_original_untouched(case):
    make = CASES[case][0]
    model, pbnn = _convert(case)
    reference = make()  # the same seed: the model before conversion
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key  # the original untouched
        assert torch.equal(pbnn.state_dict()[key], value), key  # mu under its key
    assert not any(isinstance(m, BayesianLayer) for m in model.modules())
    k = num_bayesian(pbnn)
    assert k == sum(int(m.sum()) for m in bayesian_masks(pbnn).values()) > 0
    n_orig = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in pbnn.parameters()) == n_orig + k


def test_noise_exactly_at_the_mask_and_outputs_vary(case):
    model, pbnn = _convert(case)
    for name, tensors in CASES[case][3].items():
        layer = dict(pbnn.named_modules())[name]
        for tensor in tensors:
            mu = layer._parameters[tensor].detach()
            changed = torch.zeros(mu.shape, dtype=torch.bool)
            for _ in range(20):
                changed |= layer.sample_parameter(tensor).detach() != mu
            assert torch.equal(changed, layer.bayes_mask(tensor)), (name, tensor)
    x = _batches(case)[0][0]
    assert not torch.equal(pbnn(x), pbnn(x))  # grad mode: sampled copies
    with torch.no_grad():  # in place or copied, by the tensors' k
        assert not torch.equal(pbnn(x), pbnn(x))
    for mode in (torch.enable_grad, torch.no_grad):  # (fused kernels without grad)
        with mode(), mean_weights(pbnn):
            torch.testing.assert_close(pbnn(x), model(x), rtol=0, atol=0)


def test_the_new_kind_alone_makes_the_outputs_vary(case):
    """Masks on the new kind only: the draws differ and the means give the original."""
    make, kind, _, expected = CASES[case]
    model = make()
    params = dict(model.named_parameters())
    masks = {}
    for name, tensors in expected.items():
        for tensor in tensors:
            key = f"{name}.{tensor}" if name else tensor
            masks[key] = torch.rand(params[key].shape) < 0.5
    pbnn = convert(model, masks)
    x = _inputs(kind, 4, 1)
    draws = torch.stack([pbnn(x) for _ in range(3)]).detach()
    assert not torch.equal(draws[0], draws[1])
    with mean_weights(pbnn):
        torch.testing.assert_close(pbnn(x), model(x), rtol=0, atol=0)
    assert bayes_summary(pbnn).bayesian == sum(int(m.sum()) for m in masks.values())


def test_to_deterministic_gives_the_original_back(case):
    model, pbnn = _convert(case)
    det = to_deterministic(pbnn)
    for name, module in model.named_modules():
        assert type(dict(det.named_modules())[name]) is type(module), name
    assert set(det.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(det.state_dict()[key], value), key
    x = _batches(case)[0][0]
    torch.testing.assert_close(det(x), model(x), rtol=0, atol=0)
    assert num_bayesian(pbnn) > 0  # the converted model is untouched


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_save_load_into_an_instance_round_trip(case, fmt, tmp_path):
    make = CASES[case][0]
    _, pbnn = _convert(case)
    path = tmp_path / f"model.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnnconvert.save(pbnn, path)
    loaded = bnnconvert.load(path, model=make())
    assert set(loaded.state_dict()) == set(pbnn.state_dict())
    for key, value in pbnn.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for (na, a), (nb, b) in zip(bayesian_layers(pbnn), bayesian_layers(loaded)):
        assert na == nb and type(a) is type(b) and a.bayes_names == b.bayes_names
    x = _batches(case)[0][0]
    pbnn.eval()
    torch.manual_seed(5)
    expected = pbnn(x)
    torch.manual_seed(5)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert loaded.bnnconvert_info == pbnn.bnnconvert_info


def test_kl_sums_over_the_new_entries(case):
    _, pbnn = _convert(case)
    reference = torch.zeros((), dtype=torch.float64)
    mean = torch.zeros((), dtype=torch.float64)
    for _, layer in bayesian_layers(pbnn):
        for tensor in layer.bayes_names:
            mask = layer.bayes_mask(tensor)
            mu = layer._parameters[tensor].detach()[mask].double()
            sigma = layer.posterior_sigma(tensor)[mask].double()
            kl = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0))
            reference += kl.sum()
            mean += kl.mean()
    torch.testing.assert_close(
        bnnconvert.kl_loss(pbnn, "sum").double(), reference, rtol=1e-5, atol=0
    )
    torch.testing.assert_close(bnnconvert.kl_loss(pbnn).double(), mean, rtol=1e-5, atol=0)


def test_elbo_gradients_reach_rho_and_mu_of_the_new_kinds(case):
    _, pbnn = _convert(case)
    x, y = _batches(case)[0]
    pbnn.train()
    bnnconvert.elbo_loss(pbnn, x, y, beta=0.1, samples=2).loss.backward()
    for name, tensors in CASES[case][3].items():
        layer = dict(pbnn.named_modules())[name]
        for tensor in tensors:
            rho = layer.bayes_rho(tensor).grad
            assert rho is not None and torch.isfinite(rho).all() and rho.abs().sum() > 0
            assert layer._parameters[tensor].grad is not None, tensor


def test_hoisted_samples_equal_the_plain_loop(case):
    _, pbnn = _convert(case)
    x = _batches(case)[0][0]
    with torch.no_grad():
        torch.manual_seed(2)
        hoisted = mc_outputs(pbnn, x, 3)
        torch.manual_seed(2)
        plain = torch.stack([pbnn(x) for _ in range(3)])
    assert torch.equal(hoisted, plain) and not torch.equal(plain[0], plain[1])


def test_flops_count_five_per_bayesian_entry(case):
    _, pbnn = _convert(case)
    x = _batches(case)[0][0]
    report = bnnconvert.count_flops(pbnn, x)
    k = num_bayesian(pbnn)
    assert report.bayesian_entries == k
    assert report.bayes_overhead == 5 * k
    assert set(report.bayes_by_module) == {n for n, _ in bayesian_layers(pbnn)}


def test_torch_compile_gives_the_eager_samples(case):
    _, pbnn = _convert(case)
    x = _batches(case)[0][0]
    torch._dynamo.reset()
    compiled = torch.compile(pbnn, backend="aot_eager")
    torch.manual_seed(11)
    got = torch.stack([compiled(x) for _ in range(3)]).detach()
    after = torch.rand(1)
    torch.manual_seed(11)
    expected = torch.stack([pbnn(x) for _ in range(3)]).detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, torch.rand(1))  # as many draws as the eager model
    assert not torch.equal(got[0], got[1])


def _ggn_reference(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict:
    """The exact GGN diagonal of the softmax NLL, sum_n diag(J^T (diag(p) - p p^T) J), from
    full Jacobians of the deterministic model (torch.autograd.functional.jacobian)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = {n: torch.zeros_like(params[n]) for n in names}
    for xi in x:

        def logits(*tensors, xi=xi):
            return functional_call(model, {**params, **dict(zip(names, tensors))}, (xi[None],))[0]

        jac = torch.autograd.functional.jacobian(logits, tuple(params[n] for n in names))
        p = logits(*(params[n] for n in names)).softmax(0)
        lam = torch.diag(p) - torch.outer(p, p)
        for n, j in zip(names, jac):
            j = j.reshape(p.numel(), -1)
            out[n] += torch.einsum("cp,cd,dp->p", j, lam, j).view(out[n].shape)
    return out


@pytest.mark.parametrize("case_name", ["embedding", "raw", "lstm"])
def test_laplace_curvature_of_the_new_kinds_matches_full_jacobians(case_name):
    model, pbnn = _convert(case_name)
    x = _batches(case_name, 1, 4)[0][0]
    masks = bayesian_masks(pbnn)
    with warnings.catch_warnings():  # torch.func's batching fallback for aten::lstm
        warnings.simplefilter("ignore", UserWarning)
        curv = diagonal_ggn(pbnn, [x], masks=masks, method="exact")
    reference = _ggn_reference(model, x, list(masks))
    for name, mask in masks.items():
        expected = torch.where(mask, reference[name], torch.zeros(()))
        torch.testing.assert_close(curv.diagonal[name], expected, rtol=1e-4, atol=1e-7)
    assert all(curv.diagonal[n][masks[n]].abs().sum() > 0 for n in masks)


def test_vit_grad2_selects_in_proj_entries_globally_and_pickles():
    model = _vit()
    sal = bnnconvert.compute_saliency(model, _batches("vit"))
    attention = "encoder.layers.encoder_layer_0.self_attention"
    assert {f"{attention}.in_proj_weight", f"{attention}.in_proj_bias"} <= set(sal.scores)
    pbnn = convert(model, sal, 0.2)  # the paper's global top-k
    masks = bayesian_masks(pbnn)
    top = sal.select(0.2)
    for name in (f"{attention}.in_proj_weight", f"{attention}.in_proj_bias"):
        assert torch.equal(masks[name], top[name]) and masks[name].any(), name
    mha = pbnn.get_submodule(attention)
    assert isinstance(mha, nn.MultiheadAttention)
    assert isinstance(mha.out_proj, BayesianLayer)  # mha samples its child's tensors too
    buf = io.BytesIO()
    torch.save(pbnn, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = _inputs("image", 2, 0)
    with mean_weights(again):
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_transformer_fast_path_and_separate_qkv_weights_are_sampled():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)

        def forward(self, x):
            h = self.layer(x)
            return self.cross(h, x[..., :4], x[..., :4], need_weights=False)[0]

    torch.manual_seed(0)
    model = Encoder().eval()
    kinds = parameter_kinds(model)
    assert kinds["cross.q_proj_weight"] == kinds["layer.self_attn.in_proj_weight"] == "attention"
    assert "cross.in_proj_weight" not in kinds  # None when kdim != embed_dim
    masks = {
        n: torch.rand(p.shape) < 0.5
        for n, p in convertible_parameters(model, include="attention").items()
    }
    pbnn = convert(model, masks)
    assert set(pbnn.cross.bayes_names) == {
        "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"
    }  # fmt: skip
    x = torch.randn(2, 5, 8)
    with torch.no_grad():  # the encoder layer's fused fast path reads in_proj directly
        assert not torch.equal(pbnn.layer(x), pbnn.layer(x))
        assert not torch.equal(pbnn(x), pbnn(x))
        with mean_weights(pbnn):
            torch.testing.assert_close(pbnn(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------ include / exclude
def test_default_selection_excludes_norms_and_raw_parameters():
    model = _vit()
    kinds = parameter_kinds(model)
    assert kinds["class_token"] == kinds["encoder.pos_embedding"] == "other"
    assert kinds["encoder.ln.weight"] == "norm" and kinds["conv_proj.weight"] == "conv"
    default = convertible_parameters(model)
    assert set(default) == {n for n, k in kinds.items() if k in DEFAULT_INCLUDE}
    assert not any(kinds[n] in ("norm", "other") for n in default)
    everything = convertible_parameters(model, include=("norm", "other", *DEFAULT_INCLUDE))
    assert set(everything) == {n for n, _ in model.named_parameters()}
    assert set(convertible_parameters(model, exclude="attention")) == set(default) - {
        n for n in default if n.endswith("in_proj_weight") or n.endswith("in_proj_bias")
    }
    picked = convertible_parameters(model, include=("*.in_proj_weight", "class_token"))
    assert list(picked) == [
        "class_token",
        "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
    ]
    assert set(convertible_parameters(model, include="linear", exclude="heads.*")) == {
        n for n, k in kinds.items() if k == "linear" and not n.startswith("heads.")
    }


def test_include_and_exclude_errors():
    model = _vit()
    with pytest.raises(ValueError, match="'recurent' is neither a parameter kind"):
        convertible_parameters(model, include=("linear", "recurent"))
    with pytest.raises(ValueError, match=r"'\*\.nothing' is neither"):
        convert(model, "random", 0.1, exclude="*.nothing")
    with pytest.raises(TypeError, match="include must be parameter kinds"):
        bnnconvert.compute_saliency(model, None, criterion="random", include=[3])
    with pytest.raises(ValueError, match="no Linear/Conv/ConvTranspose layer or other parameter"):
        convert(nn.Sequential(nn.LayerNorm(4)), "random", 0.5)
    with pytest.raises(ValueError, match="selected by include"):
        convert(_seeded(Scaled)(), "random", 0.5, include="embedding")


def test_saliency_include_flows_into_convert_and_is_recorded(tmp_path):
    model = _seeded(Scaled)()
    batches = _batches("raw")
    sal = bnnconvert.compute_saliency(model, batches, include=("other",))
    assert set(sal.scores) == {"scale", "shift"}
    assert sal.meta["include"] == ["other"] and sal.meta["exclude"] == []
    pbnn = convert(model, sal, 0.5)  # converts what the saliency scored
    assert [n for n, _ in bayesian_layers(pbnn)] == [""]
    assert pbnn.bnnconvert_info["include"] == ["other"]
    assert num_bayesian(pbnn) == round(0.5 * 6)
    sal.save(tmp_path / "sal.pt")  # a saved saliency keeps its selection
    again = convert(model, tmp_path / "sal.pt", 0.5)
    first, second = bayesian_masks(pbnn), bayesian_masks(again)
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    only_shift = convert(model, sal, 0.5, exclude="scale")  # include still the saliency's
    assert bayesian_masks(only_shift).keys() == {"shift"}
    assert only_shift.bnnconvert_info["include"] == ["other"]
    # a wider saliency narrowed by an explicit include; a narrower one refused
    wide = bnnconvert.compute_saliency(model, batches, include=("linear", "other"))
    narrowed = convert(model, wide, 0.5, include="scale")
    assert bayesian_masks(narrowed).keys() == {"scale"}
    assert int(bayesian_masks(narrowed)["scale"].sum()) == round(0.5 * 3)
    with pytest.raises(ValueError, match=r"were not scored \(e.g. 'body.weight'\)"):
        convert(model, sal, 0.5, include=("linear", "other"))
    # the data-free criteria score the same selection
    magnitude = convert(model, "magnitude", 1 / 3, include=("other",))
    expected = torch.cat([model.scale.detach(), model.shift.detach()]).abs().topk(2).indices
    chosen = torch.cat([bayesian_masks(magnitude).get(n, torch.zeros(3, dtype=torch.bool))
                        for n in ("scale", "shift")]).nonzero().squeeze(1)  # fmt: skip
    assert sorted(chosen.tolist()) == sorted(expected.tolist())


def test_ready_made_masks_may_name_any_parameter_unless_include_narrows():
    model = _seeded(Scaled)()
    masks = {"shift": torch.tensor([True, False, True]), "body.bias": torch.ones(3, dtype=bool)}
    pbnn = convert(model, masks)
    assert bayesian_masks(pbnn).keys() == masks.keys()
    assert pbnn.bnnconvert_info["r_bayes"] == pytest.approx(5 / (18 + 3 + 3))
    with pytest.raises(ValueError, match="outside include"):
        convert(model, masks, include="linear")


def test_bayes_summary_rows_report_each_kind():
    model, pbnn = _convert("vit")
    summary = bayes_summary(pbnn)
    rows = {r.name: r for r in summary.rows}
    attention = "encoder.layers.encoder_layer_0.self_attention"
    masks = bayesian_masks(pbnn)
    row = rows[attention]
    assert row.kind == "MultiheadAttention" and row.params == "attention"
    mha = model.get_submodule(attention)
    assert row.entries == mha.in_proj_weight.numel() + mha.in_proj_bias.numel()
    assert row.bayesian == int(masks[f"{attention}.in_proj_weight"].sum()) + int(
        masks[f"{attention}.in_proj_bias"].sum()
    )
    assert rows["conv_proj"].params == "conv" and rows["heads.head"].params == "linear"
    assert "encoder.ln" not in rows and "(root)" not in rows  # norms and raw: not scored
    assert summary.entries == sum(p.numel() for p in convertible_parameters(model).values())
    assert summary.bayesian == num_bayesian(pbnn)
    text = str(summary)
    assert "attention" in text.splitlines()[[r.name for r in summary.rows].index(attention) + 1]
    wider = bayes_summary(pbnn, include=("norm", "other", *DEFAULT_INCLUDE))
    wide_rows = {r.name: r for r in wider.rows}
    assert wide_rows["encoder.ln"].params == "norm" and wide_rows["(root)"].params == "other"
    assert wider.entries == sum(p.numel() for p in model.parameters())
    raw = bayes_summary(_convert("raw")[1])
    root = {r.name: r for r in raw.rows}["(root)"]
    assert root.kind == "Scaled" and root.params == "other" and root.entries == 6


# ------------------------------------------------------------------------ DDP
class Composite(nn.Module):
    """Every new kind at once: Embedding -> LSTM -> Linear, times a raw parameter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 6)
        self.rnn = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0][:, -1]) * self.scale


def _composite() -> nn.Module:
    torch.manual_seed(3)
    kinds = ("linear", "recurrent", "embedding", "other")
    return convert(Composite(), "magnitude", 0.3, include=kinds, scope="layer")


def _composite_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 30, (4, 5), generator=g), torch.tensor([0, 1, 2, 0])


def _ddp_grads(rank: int, world: int, port: int, folder: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_composite().train())
        x, y = _composite_batch()
        torch.manual_seed(100 + rank)  # each rank its own noise
        bnnconvert.elbo_loss(model, x, y, beta=0.1, samples=2).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        torch.save(grads, f"{folder}/grads{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_ddp_averages_the_gradients_of_every_kind(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_grads, args=(2, port, str(tmp_path)), nprocs=2)
    single = []
    for rank in range(2):  # each rank alone, with its seed
        model = _composite().train()
        x, y = _composite_batch()
        torch.manual_seed(100 + rank)
        bnnconvert.elbo_loss(model, x, y, beta=0.1, samples=2).loss.backward()
        single.append({n: p.grad for n, p in model.named_parameters()})
    assert not torch.equal(single[0]["rnn.weight_hh_l0_rho"], single[1]["rnn.weight_hh_l0_rho"])
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert {"embed.weight_rho", "rnn.weight_ih_l0_rho", "scale_rho"} <= set(got)
        for name, grad in got.items():
            mean = (single[0][name] + single[1][name]) / 2
            torch.testing.assert_close(grad, mean, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------ CUDA (cuDNN)
@cuda
def test_lstm_on_cuda_with_flattened_cudnn_weights():
    model = _seeded(LSTMClassifier)().cuda()
    masks = {n: torch.rand(p.shape) < 0.3 for n, p in convertible_parameters(model).items()}
    pbnn = convert(model, masks)
    x = _inputs("sequence", 4, 0).cuda()
    with torch.no_grad():
        reference = model(x)
        assert not torch.equal(pbnn(x), pbnn(x))
        with mean_weights(pbnn):
            torch.testing.assert_close(pbnn(x), reference, rtol=0, atol=0)
    torch.manual_seed(3)
    loss = F.cross_entropy(pbnn(x), torch.tensor([0, 1, 2, 0], device="cuda"))
    loss.backward()
    rho = pbnn.rnn.weight_hh_l0_rho.grad
    assert rho is not None and torch.isfinite(rho).all() and rho.abs().sum() > 0
    with torch.no_grad(), mean_weights(pbnn):  # mu intact after the sampled forwards
        torch.testing.assert_close(pbnn(x), reference, rtol=0, atol=0)
    cpu = copy.deepcopy(pbnn).cpu()
    with torch.no_grad(), mean_weights(cpu):
        torch.testing.assert_close(cpu(x.cpu()), reference.cpu(), rtol=1e-4, atol=1e-5)
