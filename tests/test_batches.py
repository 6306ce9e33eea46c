"""Mapping batches and structured outputs (``BatchFormat``) through every data consumer.

The reference is always the tuple path: the same weights in a model that takes one tensor
and returns the logits, fed (input, target) tuples of the same data in the same order. A
Hugging Face-like stand-in (keyword input ``pixel_values``, a dataclass output with
``.logits``) read with ``BatchFormat(["pixel_values"], "labels")`` must give the same
saliency, conversion, training step, posterior, predictions, metrics and FLOPs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import bnnconvert
from bnnconvert import BatchFormat
from bnnconvert._utils import tuple_batches
from bnnconvert.layers import bayesian_layers
from bnnconvert.losses import task_loss
from bnnconvert.methods import Deterministic, SparseBayes
from bnnconvert.sampling import hoist_plan, mc_outputs
from bnnconvert.training import evaluate_model, train

HF = BatchFormat(input_key=["pixel_values"], target_key="labels")
CLASSES = 3


# ----------------------------------------------------------------------- the models
@dataclass
class ClassifierOutput:
    """What a Hugging Face classifier returns (a ModelOutput): logits and more."""

    logits: Tensor
    hidden: Tensor | None = None


def _body() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, CLASSES),
    )


class KeywordNet(nn.Module):
    """A Hugging Face-like classifier: ``model(pixel_values=x).logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _body()

    def forward(self, pixel_values: Tensor) -> ClassifierOutput:
        return ClassifierOutput(logits=self.body(pixel_values), hidden=pixel_values.mean())


class TensorNet(nn.Module):
    """The reference: the same layers (same state_dict keys), tensor in, logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _body()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class TupleOut(TensorNet):
    """Returns (logits, features): a deep-supervision-like tuple."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.body(x), x.flatten(1)


class DictOut(TensorNet):
    """Returns {"logits": ..., "extra": ...}."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"extra": x.sum(), "logits": self.body(x)}


class SegOut(TensorNet):
    """Returns a mapping without a "logits" entry: needs an output_fn."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"seg": self.body(x)}


class DictDataset(Dataset):
    """Items {"pixel_values": (1, 8, 8), "labels": ()}; the DataLoader collates dicts."""

    def __init__(self, x: Tensor, y: Tensor, keys: tuple[str, str] = ("pixel_values", "labels")):
        self.x, self.y, self.keys = x, y, keys

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i]}


@pytest.fixture(scope="module")
def data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 8, 8, generator=gen)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return x, y


@pytest.fixture(scope="module")
def nets() -> tuple[KeywordNet, TensorNet]:
    torch.manual_seed(0)
    keyword = KeywordNet()
    reference = TensorNet()
    reference.load_state_dict(keyword.state_dict())
    return keyword, reference


def dict_loader(data, batch_size: int = 8) -> DataLoader:
    return DataLoader(DictDataset(*data), batch_size=batch_size)


def tuple_loader(data, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=batch_size)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


# ----------------------------------------------------------------------- the adapter
def test_batch_format_reads_batches_and_outputs(data):
    x, y = data
    batch = {"pixel_values": x, "labels": y, "id": "unused"}
    inputs, target = HF.split(batch)
    assert set(inputs) == {"pixel_values"} and inputs["pixel_values"] is x and target is y
    image = BatchFormat("image", "label")
    inputs, target = image.split({"image": x, "label": y})
    assert inputs is x and target is y
    assert BatchFormat().split((x, y)) == (x, y)  # tuples unchanged
    assert HF.split(x)[0]["pixel_values"] is x  # a bare tensor gets the one keyword
    logits = torch.randn(2, 3)
    for out in (logits, ClassifierOutput(logits), {"logits": logits}, (logits, x), [logits]):
        assert BatchFormat().output(out) is logits
    assert BatchFormat(output_fn=lambda o: o["seg"]).output({"seg": logits}) is logits
    mapped = tuple_batches([{"image": x, "label": y}, {"image": x}], image)  # not a loader
    assert len(mapped) == 2 and [len(b) for b in mapped] == [2, 1]
    assert next(iter(mapped))[0] is x
    loader = tuple_batches(DataLoader(DictDataset(x, y, ("image", "label")), batch_size=8), image)
    assert all(isinstance(b, tuple) and len(b) == 2 for b in loader) and len(loader) == 3
    with pytest.raises(ValueError, match="keyword inputs, which tuple batches cannot carry"):
        tuple_batches(loader, HF)


def test_clear_errors(data, nets):
    x, _ = data
    with pytest.raises(TypeError, match=r"cannot read logits from a model output of type "
                       r"dict with keys \['seg'\].*output_fn="):  # fmt: skip
        bnnconvert.predict(SegOut(), x, samples=1)
    with pytest.raises(TypeError, match="output_fn returned ClassifierOutput, not a tensor"):
        BatchFormat(output_fn=lambda o: o).output(ClassifierOutput(x))
    with pytest.raises(ValueError, match=r"input_key 'image' is not a key of the batch "
                       r"\(keys: \['labels', 'pixel_values'\]\); pass input_key="):  # fmt: skip
        bnnconvert.predict(nets[0], dict_loader(data), batch_format=BatchFormat("image"))
    with pytest.raises(ValueError, match="target_key 'label' is not a key"):
        train(copy.deepcopy(nets[0]), dict_loader(data), 1, batch_format=BatchFormat(
            ["pixel_values"], "label"), progress=False)  # fmt: skip
    with pytest.raises(TypeError, match=r"keys \['labels', 'pixel_values'\].*input_key="):
        bnnconvert.compute_saliency(nets[0], dict_loader(data))
    with pytest.raises(TypeError, match="target_key="):  # a target is needed to train
        train(copy.deepcopy(nets[0]), dict_loader(data), 1, progress=False,
              batch_format=BatchFormat(["pixel_values"]))  # fmt: skip
    with pytest.raises(TypeError, match="input_key must be a key"):
        BatchFormat(input_key=3)
    with pytest.raises(TypeError, match="output_fn must be a function"):
        BatchFormat(output_fn="logits")
    with pytest.raises(TypeError, match="batch_format must be a BatchFormat"):
        bnnconvert.predict(nets[1], x, batch_format={"input_key": "image"})


# ----------------------------------------------------------------------- the workflow
def test_saliency_and_convert_equal_the_tuple_path(data, nets):
    keyword, reference = nets
    for criterion in ("grad2", "variance"):
        got = bnnconvert.compute_saliency(
            keyword, dict_loader(data), criterion=criterion, batch_format=HF
        )
        ref = bnnconvert.compute_saliency(reference, tuple_loader(data), criterion=criterion)
        assert list(got.scores) == list(ref.scores)
        for name in ref.scores:
            torch.testing.assert_close(got.scores[name], ref.scores[name], msg=name)
    pbnn, ref_pbnn = bnnconvert.convert(keyword, got, 0.2), bnnconvert.convert(reference, ref, 0.2)
    assert_same_state(pbnn, ref_pbnn)
    assert (
        bnnconvert.bayes_summary(pbnn).bayesian == bnnconvert.bayes_summary(ref_pbnn).bayesian > 0
    )


def _converted(nets, r: float = 0.3):
    keyword, reference = nets
    pbnn = bnnconvert.convert(keyword, "magnitude", r, rho_init=-2.0)
    ref = bnnconvert.convert(reference, "magnitude", r, rho_init=-2.0)
    return pbnn, ref


def test_hoisting_keyword_inputs_and_dataclass_outputs(data, nets):
    x, _ = data
    pbnn = _converted(nets)[0]
    pbnn.eval()
    plan = hoist_plan(pbnn)
    assert plan is not None and plan.accepts({"pixel_values": x})  # the prefix is hoisted
    assert not plan.accepts({"images": x})  # a keyword the forward lacks: the plain loop
    outs = {}
    for hoist in (None, False):
        torch.manual_seed(3)
        outs[hoist] = mc_outputs(pbnn, {"pixel_values": x}, 4, hoist=hoist)
    torch.manual_seed(3)
    expected = torch.stack([pbnn(pixel_values=x).logits for _ in range(4)])
    assert torch.equal(outs[None], expected) and torch.equal(outs[False], expected)
    assert expected.std(0).max() > 0  # the samples differ: the test can fail


def test_training_step_equals_the_tuple_path(data, nets):
    pbnn, ref = _converted(nets)
    kw = {"epochs": 1, "seed": 0, "progress": False, "samples": 2, "lr": 0.05}
    got = train(pbnn, dict_loader(data), batch_format=HF, **kw)
    want = train(ref, tuple_loader(data), **kw)
    assert got.history[0]["loss"] == pytest.approx(want.history[0]["loss"], rel=1e-5)
    assert got.history[0]["steps"] == 3
    assert_same_state(pbnn, ref)
    before = _converted(nets)[0]
    changed = [
        k for k, v in before.state_dict().items() if not torch.equal(v, pbnn.state_dict()[k])
    ]
    assert any(k.endswith("_rho") for k in changed)  # the ELBO step moved sigma
    # the ELBO of one batch, for a user's own loop
    batch = next(iter(dict_loader(data)))
    x, y = HF.split(batch)
    torch.manual_seed(1)
    terms = bnnconvert.elbo_loss(pbnn, x, y, beta=0.1, samples=3, batch_format=HF)
    torch.manual_seed(1)
    ref_terms = bnnconvert.elbo_loss(ref, batch["pixel_values"], y, beta=0.1, samples=3)
    torch.testing.assert_close(terms.loss, ref_terms.loss)


def test_posterior_predict_and_evaluate_equal_the_tuple_path(data, nets):
    pbnn, ref = _converted(nets, r=0.5)
    report = bnnconvert.fit_posterior(
        pbnn, dict_loader(data), dict_loader(data), method="laplace", samples=3, batch_format=HF
    )
    ref_report = bnnconvert.fit_posterior(
        ref, tuple_loader(data), tuple_loader(data), method="laplace", samples=3
    )
    assert report.prior_precision == pytest.approx(ref_report.prior_precision, rel=1e-5)
    assert report.calibration.scale == ref_report.calibration.scale
    assert_same_state(pbnn, ref)
    torch.manual_seed(0)
    pred = bnnconvert.predict(pbnn, dict_loader(data), samples=4, batch_format=HF)
    torch.manual_seed(0)
    ref_pred = bnnconvert.predict(ref, tuple_loader(data), samples=4)
    torch.testing.assert_close(pred.probs, ref_pred.probs)
    torch.testing.assert_close(pred.mutual_info, ref_pred.mutual_info)
    assert torch.equal(pred.targets, data[1])
    assert pred.mutual_info.max() > 0  # a posterior with spread: the test can fail
    torch.manual_seed(0)  # one mapping of tensors is one batch, split by batch_size
    whole = bnnconvert.predict(pbnn, {"pixel_values": data[0]}, 4, batch_size=8, batch_format=HF)
    torch.manual_seed(0)  # (a DataLoader draws its seed from the RNG: compare with tensors)
    ref_whole = bnnconvert.predict(ref, data[0], 4, batch_size=8)
    torch.testing.assert_close(whole.probs, ref_whole.probs)
    torch.manual_seed(0)
    _, metrics = evaluate_model(pbnn, dict_loader(data), samples=3, batch_format=HF)
    torch.manual_seed(0)
    _, ref_metrics = evaluate_model(ref, tuple_loader(data), samples=3)
    assert metrics.keys() == ref_metrics.keys()
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key


def test_flops_of_keyword_inputs_equal_the_tuple_path(data, nets):
    x = data[0][:8]
    pbnn, ref = _converted(nets)
    got = bnnconvert.count_flops(pbnn, {"pixel_values": x}, samples=3)
    want = bnnconvert.count_flops(ref, x, samples=3)
    assert got.total == want.total > 0
    assert got.by_module == want.by_module and got.bayes_overhead == want.bayes_overhead > 0
    assert got.unsupported_ops == want.unsupported_ops
    cost = bnnconvert.training_cost(pbnn, {"pixel_values": x}, samples=2)
    assert cost.per_step == bnnconvert.training_cost(ref, x, samples=2).per_step


@pytest.mark.parametrize("cls", [TupleOut, DictOut])
def test_tuple_and_dict_outputs_with_tuple_batches(data, nets, cls):
    """Default reading: a tuple's first item, a mapping's "logits"; tuple batches as ever."""
    model = cls()
    model.load_state_dict(nets[1].state_dict())
    pbnn, ref = (bnnconvert.convert(m, "magnitude", 0.3) for m in (model, nets[1]))
    train(pbnn, tuple_loader(data), 1, seed=0, samples=2, progress=False)
    train(ref, tuple_loader(data), 1, seed=0, samples=2, progress=False)
    assert_same_state(pbnn, ref)
    torch.manual_seed(0)
    pred = bnnconvert.predict(pbnn, tuple_loader(data), samples=3)
    torch.manual_seed(0)
    torch.testing.assert_close(pred.probs, bnnconvert.predict(ref, tuple_loader(data), 3).probs)
    extra = data[0].numel() if cls is DictOut else 0  # its x.sum(): 1 FLOP per element
    want = bnnconvert.count_flops(ref, data[0]).total + extra
    assert bnnconvert.count_flops(pbnn, data[0]).total == want


def test_output_fn_reads_a_custom_structure(data, nets):
    model = SegOut()
    model.load_state_dict(nets[1].state_dict())
    fmt = BatchFormat(output_fn=lambda out: out["seg"])
    got = bnnconvert.compute_saliency(model, tuple_loader(data), batch_format=fmt)
    ref = bnnconvert.compute_saliency(nets[1], tuple_loader(data))
    for name in ref.scores:
        torch.testing.assert_close(got.scores[name], ref.scores[name])


@pytest.mark.filterwarnings("ignore:the temperature reached its bound")  # a 1-epoch model
def test_methods_fit_and_predict_dict_batches(data, nets):
    keyword, reference = nets
    for make in (
        lambda m: SparseBayes(m, r_bayes=0.2, samples=2),
        lambda m: Deterministic(m, temperature_scaling=True),
    ):
        got = make(keyword).fit(
            dict_loader(data), epochs=1, seed=0, val_data=dict_loader(data), batch_format=HF
        )
        want = make(reference).fit(
            tuple_loader(data), epochs=1, seed=0, val_data=tuple_loader(data)
        )
        torch.manual_seed(0)
        pred = got.predict(dict_loader(data))
        torch.manual_seed(0)
        torch.testing.assert_close(pred.probs, want.predict(tuple_loader(data)).probs)
        g, w = got.flops({"pixel_values": data[0][:8]}), want.flops(data[0][:8])
        assert {k: v for k, v in g.items() if k != "inference"} == {
            k: v for k, v in w.items() if k != "inference"
        }
        # a hoisted prediction also counts the stand-in's `hidden` (a mean over the
        # input: one FLOP per input element), once, in its deterministic prefix
        assert g["inference"] - w["inference"] in (0, data[0][:8].numel())


# ----------------------------------------------------------------------- MONAI
def test_monai_unet_trains_a_step_on_dict_batches_and_predicts():
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    unet = monai_nets.UNet(
        spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
        num_res_units=1,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 1, 16, 16, generator=gen)
    labels = (images > 0.3).long()  # MONAI's (N, 1, H, W) label maps
    fmt = BatchFormat(input_key="image", target_key="label")
    dicts = DataLoader(DictDataset(images, labels, ("image", "label")), batch_size=4)
    tuples = DataLoader(TensorDataset(images, labels), batch_size=4)
    loss = task_loss("segmentation")  # cross-entropy of (N, 1, H, W) class maps
    sal = bnnconvert.compute_saliency(unet, dicts, loss, batch_format=fmt)
    pbnn = bnnconvert.convert(unet, sal, 0.1)
    ref = copy.deepcopy(pbnn)
    before = copy.deepcopy(pbnn.state_dict())
    kw = {"task": "segmentation", "seed": 0, "samples": 2, "progress": False, "lr": 0.1}
    result = train(pbnn, dicts, 1, batch_format=fmt, **kw)
    train(ref, tuples, 1, **kw)
    assert result.history[0]["steps"] == 2
    assert_same_state(pbnn, ref)
    assert any(not torch.equal(v, pbnn.state_dict()[k]) for k, v in before.items())
    assert any(True for _ in bayesian_layers(pbnn))
    torch.manual_seed(0)
    pred = bnnconvert.predict(pbnn, dicts, samples=3, batch_format=fmt)
    torch.manual_seed(0)
    ref_pred = bnnconvert.predict(ref, tuples, samples=3)
    assert pred.probs.shape == (8, 2, 16, 16) and pred.entropy.shape == (8, 16, 16)
    torch.testing.assert_close(pred.probs, ref_pred.probs)
    assert torch.equal(pred.targets, labels)


# ----------------------------------------------------------------------- command line
def monai_like_loader(split: str = "train", batch_size: int = 8) -> DataLoader:
    """A data factory (``--data tests.test_batches:monai_like_loader``) of dict batches."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 8, 8, generator=gen)
    y = (x.mean((1, 2, 3)) > 0).long()
    return DataLoader(DictDataset(x, y, ("image", "label")), batch_size=batch_size)


def test_cli_reads_dict_batches_with_input_and_target_keys(tmp_path, nets):
    from click.testing import CliRunner

    from bnnconvert.cli import main

    weights = tmp_path / "weights.pt"
    torch.save(nets[1].state_dict(), weights)
    common = [str(weights), "--arch", "tests.test_batches:TensorNet", "--device", "cpu",
              "--data", "tests.test_batches:monai_like_loader", "--batch-size", "8"]  # fmt: skip
    out = tmp_path / "sal.pt"
    args = ["saliency", *common, "-o", str(out), "--input-key", "image", "--target-key", "label"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    loader = monai_like_loader()
    ref = bnnconvert.compute_saliency(nets[1], loader, batch_format=BatchFormat("image", "label"))
    got = bnnconvert.Saliency.load(out)
    for name in ref.scores:
        torch.testing.assert_close(got.scores[name], ref.scores[name])
    refused = CliRunner().invoke(main, ["saliency", *common, "-o", str(tmp_path / "no.pt")])
    assert refused.exit_code == 1
    assert "cannot read a batch of type dict" in refused.output
    assert "--input-key" in refused.output and not (tmp_path / "no.pt").exists()
