"""What the Linen, NNX and Equinox modules share without Flax: a ``Convention`` as options, and
the layout check that keeps a preset's axis from being applied to data laid out otherwise.

A module's options are bnjax.batch_norm's keyword options by name (plus ``track_count``). With
``convention=``, the convention's values replace the module's, except the layout: the module's
``axis`` (Flax's default -1) says where the features are, and an input for which the two axes
differ is refused (``check_layout``), so a PyTorch preset (axis 1) cannot silently normalize
the height of channels-last data whose height equals its channel count.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from bnjax import _checks
from bnjax.conventions import Convention

# Options a module passes to bnjax.batch_norm as they are (the TF features are modules' fields
# of the same names).
BATCH_NORM_OPTIONS = (
  "momentum",
  "epsilon",
  "running_variance",
  "variance",
  "backward",
  "update_stats",
  "renorm",
  "renorm_clipping",
  "renorm_momentum",
  "virtual_batch_size",
  "adjustment",
  "zero_debias",
  "on_nonfinite",
)


def _same(a: Any, b: Any) -> bool:
  try:
    return (bool(a == b) and type(a) is type(b)) or a is b
  except Exception:  # an array or an object whose == does not give a bool
    return a is b


def with_convention(
  fn: str, convention: Any, options: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
  """``options`` with ``convention``'s values, or raises where one was set to something else.

  An option conflicts when the module was given a value other than its default and other than
  the convention's (a value equal to the default cannot be told from no value, and yields).
  """
  options = dict(options)
  if convention is None:
    return options
  if not isinstance(convention, Convention):
    _checks.fail(
      fn,
      f"`convention` must be a bnjax.conventions.Convention, got {type(convention).__name__}."
      " Hint: a preset such as `bnjax.conventions.PYTORCH`, or `conventions.pytorch(...)`.",
      TypeError,
    )
  pinned = convention.options()
  del pinned["axis"]  # the layout is the module's `axis`; see check_layout
  pinned["track_count"] = convention.track_count
  unknown = sorted(set(pinned) - set(options))
  if unknown:
    _checks.fail(
      fn,
      f"`convention` {convention.name!r} sets {unknown}, which this module does not take."
      " Hint: call bnjax.batch_norm with `**convention.options()` instead.",
    )
  for name, value in pinned.items():
    given = options[name]
    if not _same(given, defaults[name]) and not _same(given, value):
      _checks.fail(
        fn,
        f"`{name}`={given!r} conflicts with `convention` {convention.name!r}, which sets"
        f" {name}={value!r}. Hint: pass one of them, e.g."
        f" `convention=convention.replace({name}={given!r})`.",
      )
  options.update(pinned)
  return options


def _canonical(axis: Any, ndim: int) -> tuple[int, ...] | None:
  axes = axis if isinstance(axis, tuple) else (axis,)
  if not all(isinstance(a, numbers.Integral) and -ndim <= int(a) < ndim for a in axes):
    return None
  return tuple(sorted(int(a) % ndim for a in axes))


def check_layout(
  fn: str, convention: Convention | None, axis: Any, ndim: int, *, axis_fixed: bool = False
) -> None:
  """Raises where ``convention``'s feature axis and the module's ``axis`` differ for rank ``ndim``.

  A rank for which the convention's axis does not exist (a rank-1 input for PyTorch's axis 1)
  has no layout to disagree with. ``axis_fixed``: the module has no ``axis`` option (Equinox's
  layer is channels-first), so the hint offers only the convention's side.
  """
  if convention is None:
    return
  preset, module = _canonical(convention.axis, ndim), _canonical(axis, ndim)
  if preset is None or module is None or preset == module:
    return
  _checks.fail(
    fn,
    f"`convention` {convention.name!r} has its features on axis {convention.axis!r}, this"
    f" module on `axis`={axis!r}: for input of rank {ndim} these are different axes"
    f" ({preset} and {module}), and where their sizes agree a wrong layout would go"
    " unnoticed. Hint: for data laid out as the module expects, pass"
    f" `convention=convention.replace(axis={axis!r})`"
    + ("." if axis_fixed else f"; for the convention's layout, pass `axis={convention.axis!r}`."),
  )
