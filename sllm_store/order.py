"""The access order of a checkpoint: the order in which a forward pass first touches its tensors.

:func:`convert` and :func:`save_model` lay a checkpoint's data out in this order and record it in
the index (``access_order``, docs/format.md), so that a load reads the first layer's bytes first
and a streaming load (docs/streaming.md) can run the first layers while the last ones arrive.

The order is traced from one forward pass of the model built on the meta device (no memory, no
computation: forward pre-hooks note which module runs first); where that is not possible (the
model cannot be built, or its forward does not run on the meta device), it is the modules'
registration order; without a model, the tensor names in natural order (``layers.2`` before
``layers.10``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

AccessOrder = Union[str, Sequence[str], None]  # "auto", "none", or the names in order


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def traced_order(model: nn.Module, example: Optional[Any] = None) -> tuple[list[str], str]:
    """The model's state-dict names in the order one forward pass first touches them, then the
    untouched ones in registration order; and how it was found (``"traced"``, or
    ``"registration"`` when the forward failed). ``example``: the forward's positional input
    (default: ``input_ids`` of 8 tokens, as a language model takes). Run it on a model on the
    meta device: nothing is computed."""
    names_of: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(t), []).append(name)
    order: list[str] = []
    seen: set[int] = set()

    def note(module: nn.Module, _args: Any) -> None:
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None and id(t) in names_of and id(t) not in seen:
                seen.add(id(t))
                order.extend(names_of[id(t)])

    hooks = [m.register_forward_pre_hook(note) for m in model.modules()]
    how = "traced"
    try:
        with torch.no_grad():
            if example is not None:
                model(example)
            else:
                device = next((p.device for p in model.parameters()), torch.device("meta"))
                model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device))
    except Exception as e:  # noqa: BLE001 - any model may fail on the meta device
        logger.info("cannot trace a forward pass of %s (%s: %s); using its registration order",
                    type(model).__name__, type(e).__name__, e)
        order.clear()
        how = "registration"
    finally:
        for h in hooks:
            h.remove()
    done = set(order)
    return order + [n for n in model.state_dict(keep_vars=True) if n not in done], how


def module_order(model: nn.Module) -> tuple[list[str], str]:
    """:func:`traced_order` of a copy of ``model`` built on the meta device from its config (a
    transformers model); its registration order otherwise."""
    config = getattr(model, "config", None)
    if config is not None:
        try:
            with torch.device("meta"):
                copy = type(model)(config)
            return traced_order(copy)
        except Exception as e:  # noqa: BLE001 - any model class
            logger.info("cannot build %s on the meta device (%s: %s)", type(model).__name__,
                        type(e).__name__, e)
    return list(model.state_dict(keep_vars=True)), "registration"


def resolve_order(order: AccessOrder, specs: Sequence[Any], model: Optional[nn.Module] = None,
                  build: Optional[Callable[[], Optional[nn.Module]]] = None) -> Optional[list[str]]:
    """The access order to record for the tensors of ``specs`` (the writer's ``TensorSpec``:
    ``name``, and ``alias_of`` for a tied name): ``order`` itself (names in order, tied names
    standing for the tensor they share; those it leaves out follow in natural order), or for
    ``"auto"`` the traced order of ``model`` (a copy of it built on the meta device) or of the
    meta-device model that ``build()`` makes, else the names' natural order; None for ``"none"``
    (the data keeps the given order, and no order is recorded)."""
    from sllm_store.errors import InvalidArgumentError

    if order is None or order == "none":
        return None
    names = [s.name for s in specs if s.alias_of is None]
    wanted = set(names)
    aliases = {s.name: s.alias_of for s in specs if s.alias_of is not None}
    if isinstance(order, str):
        if order != "auto":
            raise InvalidArgumentError(
                f"access_order must be 'auto', 'none' or a list of names, got {order!r}")
        if model is not None:
            found: Optional[tuple[list[str], str]] = module_order(model)
        else:
            built = build() if build is not None else None
            found = traced_order(built) if built is not None else None
        given = found[0] if found else []
        if found:
            logger.info("access order: %s (%d tensors)", found[1], len(given))
    else:
        given = list(order)
        unknown = [n for n in given if n not in wanted and n not in aliases]
        if unknown:
            raise InvalidArgumentError(f"access_order names {len(unknown)} tensors the checkpoint does not "
                                       f"store: {unknown[:5]}")
    out = list(dict.fromkeys(n for n in (aliases.get(n, n) for n in given) if n in wanted))
    placed = set(out)
    return out + sorted((n for n in names if n not in placed), key=natural_key)
