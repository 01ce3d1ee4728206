"""NNX parameters -> source (diffusers / transformers) tensors, by running jaxvid's key tables backwards.

`to_source(model, rules, source_shapes)` returns {source key: numpy array in the torch layout},
ready for `convert.safetensors_io.write_safetensors`; jaxvid's loader reads such a file back
through the same table. Each inverted tensor is pushed through the rule's forward transform again
and must give the parameter back bit for bit, so a table entry this module cannot invert fails
loudly instead of writing a wrong layout.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from convert.keymap import Rule

__all__ = ["flat_params", "to_source"]

# transform name -> the axes it permutes (inverse: argsort)
_PERMUTATIONS = {
    "linear_T": (1, 0),
    "conv1d_to_kio": (2, 1, 0),
    "conv2d_to_hwio": (2, 3, 1, 0),
    "conv3d_to_dhwio": (2, 3, 4, 1, 0),
}


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """{'.'-joined Param path: float32 numpy array} of a module (the paths the key tables target)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(str(p) for p in path): np.asarray(v.get_value(), np.float32) for path, v in flat}


def _invert(rule: Rule, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    name = rule.transform.name
    if name == "identity":
        out = value
    elif name in _PERMUTATIONS:
        out = np.transpose(value, np.argsort(_PERMUTATIONS[name]))
    elif name == "conv_patch_to_linear":  # linear kernel [I * p * p, O] -> Conv2d weight [O, I, p, p]
        out = value.T.reshape(shape)
    else:
        raise ValueError(f"rule {rule.source} -> {rule.target}: cannot invert transform {name!r}")
    out = np.ascontiguousarray(out.reshape(shape))
    if not np.array_equal(rule.transform(out), value):
        raise ValueError(f"rule {rule.source} -> {rule.target}: inverting {name!r} does not round-trip")
    return out


def to_source(model: nnx.Module, rules: list[Rule], source_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Every rule's source tensor (torch layout, float32) from the model's parameters.

    source_shapes: {source key: torch shape}, e.g. `convert.keymaps.cogvideox.diffusers_shapes(cfg)`
    or `jaxvid.synthetic.cogvideox.source_shapes(rules, specs)`.
    """
    params = flat_params(model)
    used = set()
    out = {}
    for rule in rules:
        if rule.target_path not in params:
            raise ValueError(f"rule {rule.source} -> {rule.target}: the model has no parameter {rule.target_path!r}")
        value = params[rule.target_path]
        if rule.target_index is not None:
            value = value[rule.target_index]
        out[rule.source] = _invert(rule, value, tuple(source_shapes[rule.source]))
        used.add(rule.target_path)
    missing = sorted(set(params) - used)
    if missing:
        raise ValueError(f"parameters no rule writes: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out
