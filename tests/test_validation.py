"""Every argument check of the public API: the exception type, and a message that names the
argument (and, where the contract says so, what was expected).

The same case runs through every entry point that takes the argument: the functional
``linear_cross_entropy`` (torch backend and ``backend="reference"``; keyword options and an
``options=LossOptions(...)`` object), the ``LinearCrossEntropyLoss`` module and, for the head tensors, ``logit_stats``. Validation
happens before dispatch, so no backend kernel runs here. (The oracle's own module,
``sftkey.reference``, shares no code with the checks and does not validate.)"""
import math

import pytest
import torch

import sftkey
from sftkey.backends.engine import MAX_TOPK

B, T, D, V = 2, 3, 8, 11


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 0] = -100
    return dict(hidden=h, weight=w, targets=y)


# Which keyword goes to the module's constructor, and which to its forward.
_MODULE_INIT = {"class_weights", "ignore_index", "label_smoothing", "z_loss", "softcap", "dft",
                "reduction", "shift", "return_stats", "backend", "filter_eps"}


def _lce_torch(hidden, weight, targets, **kw):
    kw.setdefault("backend", "torch")
    return sftkey.linear_cross_entropy(hidden, weight, targets, **kw)


def _lce_reference(hidden, weight, targets, **kw):
    return sftkey.linear_cross_entropy(hidden, weight, targets, backend="reference", **kw)


def _options_object(hidden, weight, targets, bias=None, **kw):
    kw.setdefault("backend", "torch")
    # Construction and call both inside the caller's pytest.raises: the object checks its
    # options, the call checks them against the tensors.
    return sftkey.linear_cross_entropy(hidden, weight, targets, bias=bias, options=sftkey.LossOptions(**kw))


def _module(hidden, weight, targets, **kw):
    kw.setdefault("backend", "torch")
    init = {k: v for k, v in kw.items() if k in _MODULE_INIT}
    fwd = {k: v for k, v in kw.items() if k not in _MODULE_INIT}
    # Construction and call both inside the caller's pytest.raises: the contract does not
    # say which of the two checks the options.
    return sftkey.LinearCrossEntropyLoss(**init)(hidden, weight, targets, **fwd)


def _stats_torch(hidden, weight, targets, **kw):
    kw.setdefault("backend", "torch")
    return sftkey.logit_stats(hidden, weight, targets, **kw)


def _stats_reference(hidden, weight, targets, **kw):
    return sftkey.logit_stats(hidden, weight, targets, backend="reference", **kw)


LOSS_CALLS = {"lce": _lce_torch, "lce_reference": _lce_reference, "options": _options_object, "module": _module}
STATS_CALLS = {"logit_stats": _stats_torch, "logit_stats_reference": _stats_reference}
ALL_CALLS = {**LOSS_CALLS, **STATS_CALLS}


def _meta():
    """A second device for mismatch checks: ``meta``, where this torch build supports it."""
    try:
        t = torch.zeros(2, device="meta")
        if t.device.type != "meta" or t.device == torch.zeros(2).device:
            raise RuntimeError("meta tensors report the CPU device")
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no usable meta device for a device-mismatch check: {exc}")
    return torch.device("meta")


# --------------------------------------------------------------------------- baseline


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
def test_valid_inputs_pass(call):
    """The baseline every error case perturbs is itself accepted (so a case cannot pass by
    failing on something other than the argument it changes), boundary values included."""
    inp = _inputs()
    out = ALL_CALLS[call](**inp)
    assert out is not None
    if call in LOSS_CALLS:
        assert torch.isfinite(out).all()
        y = inp["targets"].clone()
        y[0, 1] = V - 1  # the largest valid class
        y[y == -100] = -1
        y[1, 2] = -1  # a custom ignore_index
        extra = dict(ignore_index=-1, label_smoothing=1.0, z_loss=0.0, softcap=1e-3, normalizer=0.5,
                     entropy_weights=-0.5, filter_eps=0.0)
        assert torch.isfinite(LOSS_CALLS[call](inp["hidden"], inp["weight"], y, **extra)).all()
        # label_smoothing=0 and a normalizer given as a 0-d integer tensor are accepted too
        LOSS_CALLS[call](**inp, label_smoothing=0, normalizer=torch.tensor(3))


# --------------------------------------------------------------------------- types


HEAD_TYPE_CASES = {
    "hidden_list": (lambda i: {**i, "hidden": i["hidden"].tolist()}, TypeError, r"hidden must be a torch\.Tensor"),
    "weight_list": (lambda i: {**i, "weight": i["weight"].tolist()}, TypeError, r"weight must be a torch\.Tensor"),
    "targets_list": (lambda i: {**i, "targets": i["targets"].tolist()}, TypeError, r"targets must be a torch\.Tensor"),
    "hidden_int": (lambda i: {**i, "hidden": i["hidden"].long()}, TypeError, r"hidden must be a floating-point"),
    "hidden_bool": (lambda i: {**i, "hidden": i["hidden"] > 0}, TypeError, r"hidden must be a floating-point"),
    "weight_int": (lambda i: {**i, "weight": i["weight"].int()}, TypeError, r"weight must be a floating-point"),
    "targets_float": (lambda i: {**i, "targets": i["targets"].float()}, TypeError,
                      r"targets must be int64 or int32.*float32"),
    "targets_int16": (lambda i: {**i, "targets": i["targets"].to(torch.int16)}, TypeError,
                      r"targets must be int64 or int32.*int16"),
    "targets_bool": (lambda i: {**i, "targets": i["targets"] > 0}, TypeError, r"targets must be int64 or int32"),
    "hidden_complex": (lambda i: {**i, "hidden": i["hidden"].to(torch.complex64),
                                  "weight": i["weight"].to(torch.complex64)}, TypeError, r"hidden"),
}


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
@pytest.mark.parametrize("case", sorted(HEAD_TYPE_CASES))
def test_head_types(call, case):
    make, exc, msg = HEAD_TYPE_CASES[case]
    with pytest.raises(exc, match=msg):
        ALL_CALLS[call](**make(_inputs(1)))


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
@pytest.mark.parametrize("hdt,wdt", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                     (torch.float32, torch.float16)])
def test_dtype_mismatch_outside_autocast_names_both(call, hdt, wdt):
    inp = _inputs(2)
    inp["hidden"], inp["weight"] = inp["hidden"].to(hdt), inp["weight"].to(wdt)
    hname, wname = str(hdt).replace(".", r"\."), str(wdt).replace(".", r"\.")
    with pytest.raises(TypeError, match=rf"hidden.*{hname}.*weight.*{wname}"):
        ALL_CALLS[call](**inp)


# --------------------------------------------------------------------------- shapes


HEAD_SHAPE_CASES = {
    "hidden_0d": (lambda i: {**i, "hidden": torch.tensor(1.0), "targets": torch.tensor(1)}, r"hidden must have shape"),
    "weight_1d": (lambda i: {**i, "weight": i["weight"][:, 0]}, r"weight must have shape \[V, D\]"),
    "weight_3d": (lambda i: {**i, "weight": i["weight"][None]}, r"weight must have shape \[V, D\]"),
    "weight_D": (lambda i: {**i, "weight": torch.randn(V, D + 1)}, rf"weight has D={D + 1} but hidden has D={D}"),
    "weight_transposed": (lambda i: {**i, "weight": torch.randn(D, V)}, r"weight has D=11 but hidden has D=8"),
    "weight_V0": (lambda i: {**i, "weight": torch.randn(0, D)}, r"weight must have V >= 1"),
    "hidden_D0": (lambda i: {**i, "hidden": torch.randn(B, T, 0), "weight": torch.randn(V, 0)}, r"D >= 1"),
    "targets_short": (lambda i: {**i, "targets": i["targets"][:, :-1]}, rf"targets must have shape \({B}, {T}\)"),
    "targets_flat": (lambda i: {**i, "targets": i["targets"].reshape(-1)}, rf"targets must have shape \({B}, {T}\)"),
    "targets_extra_dim": (lambda i: {**i, "targets": i["targets"][..., None]}, r"targets must have shape"),
    "targets_transposed": (lambda i: {**i, "targets": i["targets"].t()}, r"targets must have shape"),
    "empty": (lambda i: {**i, "hidden": torch.randn(0, D), "targets": torch.zeros(0, dtype=torch.long)},
              r"targets is empty"),
    "empty_seq": (lambda i: {**i, "hidden": torch.randn(B, 0, D), "targets": torch.zeros(B, 0, dtype=torch.long)},
                  r"targets is empty"),
}


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
@pytest.mark.parametrize("case", sorted(HEAD_SHAPE_CASES))
def test_head_shapes(call, case):
    make, msg = HEAD_SHAPE_CASES[case]
    with pytest.raises(ValueError, match=msg):
        ALL_CALLS[call](**make(_inputs(3)))


BIAS_CASES = {
    "long": (torch.randn(V + 1), ValueError, rf"bias must have shape \({V},\)"),
    "short": (torch.randn(V - 1), ValueError, rf"bias must have shape \({V},\)"),
    "2d": (torch.randn(1, V), ValueError, r"bias must have shape"),
    "per_token": (torch.randn(B, T, V), ValueError, r"bias must have shape"),
    "scalar": (torch.tensor(0.5), ValueError, r"bias must have shape"),
    "int": (torch.zeros(V, dtype=torch.long), TypeError, r"bias must be a floating-point"),
    "list": ([0.0] * V, TypeError, r"bias must be a torch\.Tensor"),
}


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
@pytest.mark.parametrize("case", sorted(BIAS_CASES))
def test_bias(call, case):
    bias, exc, msg = BIAS_CASES[case]
    with pytest.raises(exc, match=msg):
        ALL_CALLS[call](**_inputs(4), bias=bias)


def _weights_cases(name, scalar_ok):
    cases = {
        "short": (torch.rand(B, T - 1), ValueError, rf"{name} must have shape \({B}, {T}\)"),
        "flat": (torch.rand(B * T), ValueError, rf"{name} must have shape \({B}, {T}\)"),
        "trailing_1": (torch.rand(B, T, 1), ValueError, rf"{name} must have shape"),
        "broadcastable_row": (torch.rand(1, T), ValueError, rf"{name} must have shape"),
        "one_element": (torch.rand(1), ValueError, rf"{name} must have shape"),
        "int": (torch.ones(B, T, dtype=torch.long), TypeError, rf"{name} must be a floating-point"),
        "list": ([[1.0] * T] * B, TypeError, rf"{name}"),
        "string": ("0.1", TypeError, rf"{name}"),
    }
    if not scalar_ok:
        cases["scalar_tensor"] = (torch.tensor(0.5), ValueError, rf"{name} must have shape")
        cases["python_float"] = (0.5, TypeError, rf"{name} must be a torch\.Tensor")
    else:
        cases["nan"] = (math.nan, ValueError, rf"{name} must not be NaN")
    return cases


def _one_entry(value):
    weights = torch.rand(B, T)
    weights[1, 2] = value
    return weights


TOKEN_WEIGHT_CASES = {
    **_weights_cases("token_weights", scalar_ok=False),
    "negative": (_one_entry(-0.5), ValueError, r"token_weights must be >= 0 .*found -0\.5"),
    "nan_entry": (_one_entry(math.nan), ValueError, r"token_weights must be >= 0 .*found nan"),
}
ENTROPY_WEIGHT_CASES = _weights_cases("entropy_weights", scalar_ok=True)


@pytest.mark.parametrize("call", sorted(LOSS_CALLS))
@pytest.mark.parametrize("case", sorted(TOKEN_WEIGHT_CASES))
def test_token_weights(call, case):
    value, exc, msg = TOKEN_WEIGHT_CASES[case]
    with pytest.raises(exc, match=msg):
        LOSS_CALLS[call](**_inputs(5), token_weights=value)


@pytest.mark.parametrize("call", sorted(LOSS_CALLS))
@pytest.mark.parametrize("case", sorted(ENTROPY_WEIGHT_CASES))
def test_entropy_weights(call, case):
    value, exc, msg = ENTROPY_WEIGHT_CASES[case]
    with pytest.raises(exc, match=msg):
        LOSS_CALLS[call](**_inputs(6), entropy_weights=value)


CLASS_WEIGHT_CASES = {
    "long": (torch.rand(V + 1), ValueError, rf"class_weights must have shape \({V},\)"),
    "short": (torch.rand(V - 1), ValueError, rf"class_weights must have shape \({V},\)"),
    "2d": (torch.rand(1, V), ValueError, r"class_weights must have shape"),
    "scalar": (torch.tensor(1.0), ValueError, r"class_weights must have shape"),
    "int": (torch.ones(V, dtype=torch.long), TypeError, r"class_weights must be a floating-point"),
}


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
@pytest.mark.parametrize("case", sorted(CLASS_WEIGHT_CASES))
def test_class_weights(call, case):
    value, exc, msg = CLASS_WEIGHT_CASES[case]
    with pytest.raises(exc, match=msg):
        ALL_CALLS[call](**_inputs(7), class_weights=value)


@pytest.mark.parametrize("call", ["lce", "lce_reference"])
def test_class_weights_list(call):
    with pytest.raises(TypeError, match="class_weights"):
        LOSS_CALLS[call](**_inputs(7), class_weights=[1.0] * V)


def test_module_class_weights_list():
    # the module keeps class_weights as a buffer: a list cannot be one
    with pytest.raises(TypeError, match="class_weights"):
        sftkey.LinearCrossEntropyLoss(class_weights=[1.0] * V)


# --------------------------------------------------------------------------- devices


def _on(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


DEVICE_CASES = {
    # argument moved to the other device -> (extra kwargs on the other device, argument named)
    "weight": lambda i, dev: ({**i, "weight": i["weight"].to(dev)}, {}),
    "targets": lambda i, dev: ({**i, "targets": i["targets"].to(dev)}, {}),
    "bias": lambda i, dev: (i, {"bias": torch.zeros(V, device=dev)}),
    "class_weights": lambda i, dev: (i, {"class_weights": torch.ones(V, device=dev)}),
    "token_weights": lambda i, dev: (i, {"token_weights": torch.ones(B, T, device=dev)}),
    "entropy_weights": lambda i, dev: (i, {"entropy_weights": torch.ones(B, T, device=dev)}),
    "entropy_weights_0d": lambda i, dev: (i, {"entropy_weights": torch.tensor(0.1, device=dev)}),
}
_LOSS_ONLY = {"token_weights", "entropy_weights", "entropy_weights_0d"}


_DEVICE_PARAMS = [(call, case) for call in sorted(ALL_CALLS) for case in sorted(DEVICE_CASES)
                  if not (case in _LOSS_ONLY and call in STATS_CALLS)]


@pytest.mark.parametrize("call,case", _DEVICE_PARAMS)
def test_device_mismatch(call, case):
    # Only the *other* tensor goes to ``meta``: hidden stays on the CPU, since the API asks
    # ``torch.is_autocast_enabled(hidden.device.type)``, which has no answer for ``meta``.
    meta = _meta()
    inp, extra = DEVICE_CASES[case](_inputs(8), meta)
    name = case.replace("_0d", "")
    with pytest.raises(ValueError, match=rf"(^|[^_]){name} is on meta but hidden is on cpu"):
        ALL_CALLS[call](**inp, **extra)


# --------------------------------------------------------------------------- targets range


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
@pytest.mark.parametrize("bad,ignore_index", [(V, -100), (V + 5, -100), (-1, -100), (-100, 0), (-100, -1),
                                              (-7, -100)])
def test_targets_out_of_range(call, bad, ignore_index):
    inp = _inputs(10)
    y = inp["targets"].clone()
    y[y == -100] = 2
    y[1, 1] = bad
    inp["targets"] = y
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {V}\).*ignore_index={ignore_index}.*found {bad}"):
        ALL_CALLS[call](**inp, ignore_index=ignore_index)


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
def test_targets_out_of_range_int32(call):
    inp = _inputs(11)
    inp["targets"] = inp["targets"].clamp_min(0).int()
    inp["targets"][0, 2] = V
    with pytest.raises(ValueError, match=r"targets must lie in"):
        ALL_CALLS[call](**inp)


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
@pytest.mark.parametrize("value", [-100.0, True, "x", None])
def test_ignore_index_type(call, value):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ALL_CALLS[call](**_inputs(12), ignore_index=value)


# --------------------------------------------------------------------------- scalar options


OPTION_CASES = {
    # name: [(value, exception, message)]
    "label_smoothing": [(-0.1, ValueError, r"label_smoothing must be >= 0"),
                        (1.5, ValueError, r"label_smoothing must be <= 1"),
                        (math.nan, ValueError, r"label_smoothing must not be NaN"),
                        ("0.1", TypeError, r"label_smoothing must be a real number"),
                        (None, TypeError, r"label_smoothing must be a real number")],
    "z_loss": [(-1e-4, ValueError, r"z_loss must be >= 0"),
               (-math.inf, ValueError, r"z_loss must be >= 0"),
               (math.nan, ValueError, r"z_loss must not be NaN"),
               ("1e-4", TypeError, r"z_loss must be a real number")],
    "softcap": [(-30.0, ValueError, r"softcap must be > 0"),
                (0.0, ValueError, r"softcap must be > 0"),
                (0, ValueError, r"softcap must be > 0"),
                (math.nan, ValueError, r"softcap must not be NaN"),
                ("30", TypeError, r"softcap must be a real number")],
    "reduction": [("avg", ValueError, r"reduction must be one of .*'avg'"),
                  ("Mean", ValueError, r"reduction must be one of"),
                  ("batchmean", ValueError, r"reduction must be one of"),
                  (None, ValueError, r"reduction must be one of")],
    "backend": [("cuda", ValueError, r"backend must be one of .*'cuda'"),
                ("Torch", ValueError, r"backend must be one of"),
                ("liger", ValueError, r"backend must be one of")],
    "normalizer": [(0, ValueError, r"normalizer must be > 0"),
                   (-4, ValueError, r"normalizer must be > 0"),
                   (0.0, ValueError, r"normalizer must be > 0"),
                   (math.nan, ValueError, r"normalizer must not be NaN"),
                   (torch.tensor(0.0), ValueError, r"normalizer must be > 0"),
                   (torch.tensor(-2), ValueError, r"normalizer must be > 0"),
                   (torch.tensor([1.0, 2.0]), ValueError, r"normalizer must be a scalar"),
                   (torch.ones(B, T), ValueError, r"normalizer must be a scalar"),
                   ("4", TypeError, r"normalizer must be a real number"),
                   (True, TypeError, r"normalizer must be a real number")],
    "shift": [("yes", TypeError, r"shift must be a bool"),
              (1, TypeError, r"shift must be a bool")],
    "filter_eps": [(-1e-3, ValueError, r"filter_eps must be >= 0"),
                   ("0", TypeError, r"filter_eps must be a real number")],
}
_STATS_OPTIONS = {"softcap", "backend", "filter_eps"}


def _applies(call, name):
    if call in STATS_CALLS and name not in _STATS_OPTIONS:
        return False  # logit_stats takes no such option
    if name == "backend" and "reference" in call:
        return False  # the reference entry points ignore backend (tested below for the others)
    if name == "filter_eps" and call == "logit_stats_reference":
        return False  # reference.logit_stats documents filter_eps as ignored
    return True


_OPTION_PARAMS = [(call, name, i) for call in sorted(ALL_CALLS) for name, cases in OPTION_CASES.items()
                  for i in range(len(cases)) if _applies(call, name)]


@pytest.mark.parametrize("call,name,i", _OPTION_PARAMS, ids=[f"{c}-{n}-{i}" for c, n, i in _OPTION_PARAMS])
def test_option(call, name, i):
    value, exc, msg = OPTION_CASES[name][i]
    with pytest.raises(exc, match=msg):
        ALL_CALLS[call](**_inputs(13), **{name: value})


def test_backend_validated_by_module_and_logit_stats():
    inp = _inputs(14)
    with pytest.raises(ValueError, match="backend must be one of"):
        sftkey.LinearCrossEntropyLoss(backend="gpu")(**inp)
    with pytest.raises(ValueError, match="backend must be one of"):
        sftkey.logit_stats(**inp, backend="gpu")


@pytest.mark.parametrize("call", sorted(LOSS_CALLS))
def test_shift_needs_a_sequence_dimension(call):
    g = torch.Generator().manual_seed(15)
    h, w, y = torch.randn(D, generator=g), torch.randn(V, D, generator=g), torch.tensor(3)
    with pytest.raises(ValueError, match=r"shift=True needs targets with a sequence dimension"):
        LOSS_CALLS[call](h, w, y, shift=True)


# --------------------------------------------------------------------------- topk


@pytest.mark.parametrize("call", sorted(STATS_CALLS))
@pytest.mark.parametrize("topk", [-1, MAX_TOPK + 1, 100, 2.0, True, "2", None])
def test_topk(call, topk):
    with pytest.raises(ValueError, match=rf"topk must be an int in \[0, {MAX_TOPK}\]"):
        STATS_CALLS[call](**_inputs(16), topk=topk)


@pytest.mark.parametrize("call", sorted(STATS_CALLS))
def test_topk_larger_than_vocabulary(call):
    """(The reference path used to skip this check and fail inside torch.topk with a RuntimeError.)"""
    g = torch.Generator().manual_seed(17)
    h, w, y = torch.randn(4, D, generator=g), torch.randn(5, D, generator=g), torch.tensor([0, 1, 2, 3])
    st = STATS_CALLS[call](h, w, y, topk=5)  # k = V is fine
    assert st.topk.shape == (4, 5)
    with pytest.raises(ValueError, match=r"topk=6 exceeds the vocabulary size 5"):
        STATS_CALLS[call](h, w, y, topk=6)


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
def test_bias_dtype_mismatch_outside_autocast(call):
    inp = _inputs(3)
    inp["bias"] = torch.zeros(V, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"bias \(torch\.float64\) and weight \(torch\.float32\)"):
        ALL_CALLS[call](**inp)


@pytest.mark.parametrize("call", sorted(LOSS_CALLS))
@pytest.mark.parametrize("dft", [1, "yes", None])
def test_dft_must_be_bool(call, dft):
    with pytest.raises(TypeError, match=r"dft must be a bool"):
        LOSS_CALLS[call](**_inputs(4), dft=dft)


def test_hidden_on_meta_is_a_validation_error():
    """A second device is caught by the checks, not by autocast's device lookup."""
    inp = _inputs(5)
    inp["hidden"] = inp["hidden"].to(_meta())
    with pytest.raises(ValueError, match=r"weight is on cpu but hidden is on meta"):
        sftkey.linear_cross_entropy(**inp)
