"""Structures from and to torch modules (docs/torch.md): MLPs, Elman RNNs, convolutional and
residual networks, and BatchNorm folded away."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._common import nn, torch


def _activation(m: nn.Module, where: str) -> str:
    """The structure's name for an activation module, or a ValueError saying why not."""
    kind = type(m)
    if kind is nn.ReLU6:  # a Hardtanh subclass: test it first
        return "relu6"
    if kind is nn.Hardtanh:
        if (m.min_val, m.max_val) != (-1.0, 1.0):
            raise ValueError(f"{where}: only Hardtanh(-1, 1) is the structure's 'hardtanh'")
        return "hardtanh"
    if kind is nn.LeakyReLU:
        if m.negative_slope != 0.01:
            raise ValueError(f"{where}: only LeakyReLU(0.01) is the structure's 'leaky_relu'")
        return "leaky_relu"
    names = {
        nn.Identity: "identity",
        nn.ReLU: "relu",
        nn.Sigmoid: "sigmoid",
        nn.Tanh: "tanh",
        nn.GELU: "gelu",
    }
    if kind in names:
        return names[kind]
    raise ValueError(
        f"{where}: {kind.__name__} is not an activation the lattice knows "
        "(identity, relu, relu6, hardtanh, sigmoid, tanh, gelu, leaky_relu)"
    )


def _flatten(seq: nn.Sequential, prefix: str = "") -> Iterable[tuple[str, nn.Module]]:
    for name, m in seq.named_children():
        if isinstance(m, nn.Sequential):
            yield from _flatten(m, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", m


def structure_of(
    module: nn.Module, head: nn.Linear | None = None, input_shape: Sequence[int] | None = None
) -> dict[str, Any]:
    """The structure JSON (docs/service.md) of a torch network.

    ``module`` is an ``nn.Sequential`` of ``nn.Linear`` layers, each followed by at
    most one activation (``nn.Flatten`` first and ``nn.Dropout`` anywhere are
    allowed: they hold no parameters): an MLP's ``widths`` JSON; or an Elman
    ``nn.RNN`` without bias with its output layer ``head`` (an ``nn.Linear`` without
    bias). A ``Sequential`` with ``nn.Conv2d``, pools (``MaxPool2d``, ``AvgPool2d``,
    ``AdaptiveAvgPool2d(1)``), ``nn.Flatten`` or :class:`Residual` blocks (or given an
    ``input_shape``) is a network: its ``input`` and ``stages`` JSON (docs/theory.md
    §10); ``input_shape`` (``[C, H, W]``) is then required once there is a conv.
    Anything the lattice cannot describe (grouped or dilated convolutions, BatchNorm
    not folded, attention, mixed biases in an MLP, a ``bias=True`` RNN, whose two bias
    vectors only their sum identifies) raises a ``ValueError`` naming the module.
    """
    if isinstance(module, nn.RNN):
        return _rnn_structure(module, head)
    if isinstance(module, nn.Sequential) and (
        input_shape is not None or any(not _mlp_part(m) for _, m in _flatten(module))
    ):
        if head is not None:
            raise ValueError("head is only for an nn.RNN; put the output layer in the Sequential")
        return _network_structure(module, input_shape)
    if head is not None:
        raise ValueError("head is only for an nn.RNN; put the output layer in the Sequential")
    if not isinstance(module, nn.Sequential):
        raise ValueError(
            f"structure_of takes an nn.Sequential of Linear layers and activations "
            f"(or an nn.RNN with a Linear head); got {type(module).__name__}"
        )
    widths: list[int] = []
    acts: list[str] = []
    biases: set[bool] = set()
    activated = False
    for name, m in _flatten(module):
        where = f"module {name!r}"
        if isinstance(m, nn.Linear):
            if widths and m.in_features != widths[-1]:
                raise ValueError(
                    f"{where}: in_features {m.in_features} != the previous width {widths[-1]}"
                )
            if not widths:
                widths.append(m.in_features)
            widths.append(m.out_features)
            acts.append("identity")
            activated = False
            biases.add(m.bias is not None)
        elif isinstance(m, nn.Dropout) or (isinstance(m, nn.Flatten) and not widths):
            continue
        elif not widths:
            raise ValueError(f"{where}: the network must start with a Linear layer")
        elif activated:
            raise ValueError(f"{where}: one activation per layer; two follow each other here")
        else:
            acts[-1], activated = _activation(m, where), True
    if len(widths) < 3:
        raise ValueError("a structure needs at least two Linear layers (T >= 3 positions)")
    if len(biases) > 1:
        raise ValueError("every Linear layer must have a bias, or none of them")
    return {
        "widths": widths,
        "activation": acts[:-1],
        "output_activation": acts[-1],
        "bias": biases.pop(),
        "kind": "mlp",
    }


_MODULES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardtanh": nn.Hardtanh,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": lambda: nn.GELU(approximate="tanh"),  # the planner's gelu is the tanh form
    "leaky_relu": nn.LeakyReLU,
}


def module_of(structure: Mapping[str, Any], dtype: torch.dtype | None = None) -> nn.Sequential:
    """The ``nn.Sequential`` of a structure JSON (a plan's ``student``, say): the inverse of
    :func:`structure_of` for an MLP or a network. Its parameters are torch's default
    initialisation; :func:`load_mean` puts a prior's mean in them."""
    if "stages" in structure:
        return _network_module(structure).to(dtype or torch.get_default_dtype())
    if structure.get("kind", "mlp") != "mlp":
        raise ValueError("module_of builds MLPs; build an RNN teacher's student by hand")
    widths = [int(w) for w in structure["widths"]]
    hidden = structure.get("activation", "relu")
    acts = [hidden] * (len(widths) - 2) if isinstance(hidden, str) else list(hidden)
    acts.append(structure.get("output_activation", "identity"))
    if len(acts) != len(widths) - 1 or any(a not in _MODULES for a in acts):
        raise ValueError(f"cannot build activations {acts} for widths {widths}")
    layers: list[nn.Module] = []
    for i, act in enumerate(acts):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bool(structure.get("bias", False))))
        if act != "identity":
            layers.append(_MODULES[act]())
    return nn.Sequential(*layers).to(dtype or torch.get_default_dtype())


def _rnn_structure(rnn: nn.RNN, head: nn.Linear | None) -> dict[str, Any]:
    if not isinstance(head, nn.Linear):
        raise ValueError("an nn.RNN needs its output layer: structure_of(rnn, head=nn.Linear(...))")
    if rnn.bias or head.bias is not None:
        raise ValueError(
            "an RNN teacher must have no biases: torch's RNN keeps two bias vectors per layer "
            "(b_ih, b_hh) and only their sum is identifiable (use bias=False on both)"
        )
    if rnn.bidirectional or getattr(rnn, "proj_size", 0):
        raise ValueError("bidirectional or projected RNNs are not Elman networks")
    if head.in_features != rnn.hidden_size:
        raise ValueError(f"head.in_features {head.in_features} != hidden_size {rnn.hidden_size}")
    return {
        "widths": [rnn.input_size, *[rnn.hidden_size] * rnn.num_layers, head.out_features],
        "activation": [rnn.nonlinearity] * rnn.num_layers,
        "output_activation": "identity",
        "bias": False,
        "kind": "rnn",
    }


# ---------------------------------------------------------------------------------------------
# convolutional and residual networks (docs/theory.md §10)
# ---------------------------------------------------------------------------------------------


class Residual(nn.Module):
    """``activation(shortcut(x) + branch(x))``: a residual block the lattice describes.

    ``branch`` is a chain of ``nn.Conv2d`` or ``nn.Linear`` layers with activations (an
    ``nn.Sequential``, or one layer); ``shortcut`` is ``None`` (the identity) or a
    projection (one ``nn.Conv2d`` or ``nn.Linear``, no activation); ``activation`` an
    activation module or ``None`` (the identity). Its parameters are the branch's, then the
    projection's: ``parameters_to_vector`` order is the service's layout.
    """

    def __init__(
        self,
        branch: nn.Module,
        shortcut: nn.Module | None = None,
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x if self.shortcut is None else self.shortcut(x)
        y = s + self.branch(x)
        return y if self.activation is None else self.activation(y)


_DROPOUT = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)


def _mlp_part(m: nn.Module) -> bool:
    """Whether ``m`` can be part of an MLP's ``Sequential`` (a layer, an activation, a
    dropout or a flatten)."""
    if isinstance(m, (nn.Linear, nn.Flatten, *_DROPOUT)):
        return True
    try:
        _activation(m, "")
    except ValueError:
        return False
    return True


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _layer_stage(m: nn.Module, where: str) -> dict[str, Any]:
    if isinstance(m, nn.Linear):
        return {
            "type": "linear",
            "out": m.out_features,
            "bias": m.bias is not None,
            "activation": "identity",
        }
    if not isinstance(m, nn.Conv2d):
        raise ValueError(f"{where}: {type(m).__name__} is not a Conv2d or Linear layer")
    if m.groups != 1:
        raise ValueError(f"{where}: a grouped convolution (groups={m.groups}) is not a stage")
    if tuple(m.dilation) != (1, 1):
        raise ValueError(f"{where}: a dilated convolution ({tuple(m.dilation)}) is not a stage")
    if m.padding_mode != "zeros":
        raise ValueError(f"{where}: only zero padding is a stage; got {m.padding_mode!r}")
    padding = m.padding
    if isinstance(padding, str):  # 'valid' or 'same'
        if padding == "valid":
            padding = (0, 0)
        elif all(k % 2 for k in m.kernel_size) and tuple(m.stride) == (1, 1):
            padding = tuple(k // 2 for k in m.kernel_size)
        else:
            raise ValueError(f"{where}: padding='same' needs odd kernels and stride 1 here")
    return {
        "type": "conv",
        "out": m.out_channels,
        "kernel": _pair(m.kernel_size),
        "stride": _pair(m.stride),
        "padding": _pair(padding),
        "bias": m.bias is not None,
        "activation": "identity",
    }


def _stages(items: Iterable[tuple[str, nn.Module]], in_block: bool = False) -> list[dict]:
    stages: list[dict] = []
    pending: dict | None = None  # the layer an activation would follow
    for name, m in items:
        where = f"module {name!r}"
        if isinstance(m, nn.Conv2d | nn.Linear):
            stages.append(_layer_stage(m, where))
            pending = stages[-1]
            continue
        if isinstance(m, _DROPOUT):
            continue
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            raise ValueError(
                f"{where}: BatchNorm is not a stage; fold it into the layer before it first "
                "(fold_batchnorm(model), exact in evaluation mode)"
            )
        if in_block and isinstance(m, nn.MaxPool2d | nn.AvgPool2d | nn.Flatten | Residual):
            raise ValueError(f"{where}: a residual branch holds conv or linear layers only")
        pending_was, pending = pending, None
        if isinstance(m, nn.MaxPool2d):
            if m.dilation not in (1, (1, 1)) or m.ceil_mode or m.return_indices:
                raise ValueError(f"{where}: only plain MaxPool2d (no dilation, no ceil_mode)")
            stages.append(
                {
                    "type": "pool",
                    "mode": "max",
                    "kernel": _pair(m.kernel_size),
                    "stride": _pair(m.stride or m.kernel_size),
                    "padding": _pair(m.padding),
                }
            )
        elif isinstance(m, nn.AvgPool2d):
            if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
                raise ValueError(
                    f"{where}: only plain AvgPool2d (count_include_pad, no ceil_mode or divisor)"
                )
            stages.append(
                {
                    "type": "pool",
                    "mode": "avg",
                    "kernel": _pair(m.kernel_size),
                    "stride": _pair(m.stride or m.kernel_size),
                    "padding": _pair(m.padding),
                }
            )
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if _pair(m.output_size) != [1, 1]:
                raise ValueError(f"{where}: only AdaptiveAvgPool2d(1), the global average")
            stages.append({"type": "pool", "mode": "avg", "global": True})
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                raise ValueError(f"{where}: only Flatten(1, -1) is a stage")
            stages.append({"type": "flatten"})
        elif isinstance(m, Residual):
            stages.append(_residual_stage(m, where))
        else:
            act = _activation(m, where)  # a ValueError naming anything else
            if pending_was is None or pending_was["activation"] != "identity":
                raise ValueError(f"{where}: an activation must follow a Conv2d or Linear layer")
            pending_was["activation"] = act
    return stages


def _residual_stage(m: Residual, where: str) -> dict[str, Any]:
    branch = m.branch if isinstance(m.branch, nn.Sequential) else nn.Sequential(m.branch)
    items = [(f"{where[8:-1]}.branch.{n}", c) for n, c in _flatten(branch)]
    layers = _stages(items, in_block=True)
    if not layers:
        raise ValueError(f"{where}: a residual branch needs a Conv2d or Linear layer")
    shortcut = None
    if m.shortcut is not None:
        if not isinstance(m.shortcut, nn.Conv2d | nn.Linear):
            raise ValueError(f"{where}: a shortcut is None or one Conv2d or Linear layer")
        shortcut = _layer_stage(m.shortcut, f"{where}.shortcut")
    act = "identity" if m.activation is None else _activation(m.activation, where)
    return {"type": "residual", "branch": layers, "shortcut": shortcut, "activation": act}


def _network_structure(module: nn.Sequential, input_shape) -> dict[str, Any]:
    items = list(_flatten(module))
    stages = _stages(items)
    if input_shape is None:
        first = next((s for s in stages if s["type"] in ("conv", "linear", "residual")), None)
        first_module = next(
            (m for _, m in items if isinstance(m, nn.Conv2d | nn.Linear | Residual)), None
        )
        if first is None or first["type"] != "linear":
            raise ValueError(
                "a network with convolutions needs its input shape: "
                "structure_of(model, input_shape=[C, H, W])"
            )
        input_shape = [first_module.in_features]
    out = {"input": [int(x) for x in input_shape], "stages": stages}
    try:  # torch's own shape checks: a layer's in_channels or in_features that do not fit
        with torch.no_grad():
            p = next(module.parameters(), None)
            dtype = p.dtype if p is not None else torch.get_default_dtype()
            module(torch.zeros(2, *out["input"], dtype=dtype))
    except RuntimeError as exc:
        raise ValueError(
            f"the module does not run on inputs of shape {out['input']}: {exc}"
        ) from None
    return out


def _network_module(structure: Mapping[str, Any]) -> nn.Sequential:
    shape = [int(x) for x in structure["input"]]

    def layer(st: Mapping[str, Any]) -> list[nn.Module]:
        nonlocal shape
        if st["type"] == "conv":
            k, s, p = (
                _pair(st.get(f, d)) for f, d in (("kernel", 3), ("stride", 1), ("padding", 0))
            )
            m = nn.Conv2d(shape[0], st["out"], k, s, p, bias=st.get("bias", True))
            shape = [
                st["out"],
                (shape[1] + 2 * p[0] - k[0]) // s[0] + 1,
                (shape[2] + 2 * p[1] - k[1]) // s[1] + 1,
            ]
        else:
            m = nn.Linear(shape[0], st["out"], bias=st.get("bias", True))
            shape = [st["out"]]
        act = st.get("activation", "identity")
        return [m] if act == "identity" else [m, _MODULES[act]()]

    mods: list[nn.Module] = []
    for st in structure["stages"]:
        kind = st["type"]
        if kind in ("conv", "linear"):
            mods += layer(st)
        elif kind == "pool":
            if st.get("global"):
                mods.append(nn.AdaptiveAvgPool2d(1))
                shape = [shape[0], 1, 1]
                continue
            k = _pair(st.get("kernel", 2))
            s = _pair(st.get("stride") or k)
            p = _pair(st.get("padding", 0))
            cls = nn.MaxPool2d if st.get("mode", "max") == "max" else nn.AvgPool2d
            mods.append(cls(k, s, p))
            shape = [
                shape[0],
                (shape[1] + 2 * p[0] - k[0]) // s[0] + 1,
                (shape[2] + 2 * p[1] - k[1]) // s[1] + 1,
            ]
        elif kind == "flatten":
            mods.append(nn.Flatten())
            n = 1
            for x in shape:
                n *= x
            shape = [n]
        else:
            before = list(shape)
            branch = nn.Sequential(*[m for b in st["branch"] for m in layer(b)])
            after, shortcut = list(shape), None
            if st.get("shortcut"):
                shape = before
                shortcut = layer(st["shortcut"])[0]
                shape = after
            act = st.get("activation", "identity")
            mods.append(Residual(branch, shortcut, None if act == "identity" else _MODULES[act]()))
    return nn.Sequential(*mods)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``BatchNorm1d``/``BatchNorm2d`` folded into the
    ``Conv2d`` or ``Linear`` layer right before it (in a ``Sequential`` or a
    :class:`Residual` branch): ``W' = W·γ/√(σ²+ε)`` per output channel and ``b' =
    (b − μ)·γ/√(σ²+ε) + β``, with the running statistics. Exact in evaluation mode (what a
    fitted model's posterior is computed in); a folded layer always has a bias."""
    return _fold(copy.deepcopy(model))


def _fold(m: nn.Module) -> nn.Module:
    if isinstance(m, Residual):
        m.branch = _fold(m.branch)
        return m
    if not isinstance(m, nn.Sequential):
        return m
    out: list[nn.Module] = []
    for name, child in m.named_children():
        child = _fold(child)
        if isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d):
            if not out or not isinstance(out[-1], nn.Conv2d | nn.Linear):
                raise ValueError(
                    f"module {name!r}: a BatchNorm folds only into the Conv2d or Linear layer "
                    "right before it"
                )
            out[-1] = _folded(out[-1], child, name)
        else:
            out.append(child)
    return nn.Sequential(*out)


def _folded(layer: nn.Module, bn: nn.Module, name: str) -> nn.Module:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"module {name!r}: a BatchNorm without running statistics cannot fold")
    with torch.no_grad():
        scale = 1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        new = copy.deepcopy(layer)
        if layer.bias is None:
            new.bias = nn.Parameter(torch.zeros_like(scale))  # registered after the weight
        shape = (-1,) + (1,) * (layer.weight.ndim - 1)
        new.weight.copy_(layer.weight * scale.reshape(shape))
        b = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        new.bias.copy_(b * scale + shift)
    return new
