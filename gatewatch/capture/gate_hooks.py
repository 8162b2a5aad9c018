"""One forward hook (and one pre-forward hook) per module, shared by every quantity that listens to it.

Each module a quantity listens to gets at most one PyTorch forward hook and one forward pre-hook, whatever the
number of listeners: a hooked module takes PyTorch's slower call path once, not once per quantity. The hook hands
each call to the listeners in the order they were added, as a :class:`HookCall`, whose :meth:`HookCall.probs`
turns a gate's output into probabilities once for all of them.

Listeners see training-mode forwards only, and never a forward recomputed inside the backward by activation
checkpointing (``torch.utils.checkpoint`` runs the forward again during the backward; counting it would count
its samples twice). The hook is removed with its last listener.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..gating.specs import ResolvedGate


class HookCall:
    """One call of a module, as its listeners see it: the module, its positional inputs and (forward hooks) its
    output."""

    __slots__ = ("_probs", "args", "module", "output")

    def __init__(self, module: nn.Module, args: tuple[Any, ...], output: Any = None) -> None:
        self.module, self.args, self.output = module, args, output
        self._probs: dict[int, torch.Tensor] = {}

    def probs(self, gate: ResolvedGate) -> torch.Tensor:
        """``gate.to_probs(output)``, computed once per call for every listener."""
        have = self._probs.get(id(gate))
        if have is None:
            have = self._probs[id(gate)] = gate.to_probs(self.output)
        return have


Listener = Callable[[HookCall], None]


def recomputing() -> bool:
    """True inside a backward pass: a forward run now is activation checkpointing's recomputation."""
    return torch._C._current_graph_task_id() != -1


class _ModuleHooks:
    """The listeners of one module and the (at most two) PyTorch hooks that call them."""

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)
        self.listeners: dict[bool, list[Listener]] = {False: [], True: []}  # pre -> listeners
        self.handles: dict[bool, torch.utils.hooks.RemovableHandle] = {}

    def add(self, fn: Listener, pre: bool) -> None:
        module = self.module()
        assert module is not None
        self.listeners[pre].append(fn)
        if pre not in self.handles:
            self.handles[pre] = (module.register_forward_pre_hook(self._pre) if pre
                                 else module.register_forward_hook(self._post))

    def remove(self, fn: Listener, pre: bool) -> bool:
        """Remove ``fn``; True when the module has no listener left."""
        listeners = self.listeners[pre]
        if fn in listeners:
            listeners.remove(fn)
        if not listeners and pre in self.handles:
            self.handles.pop(pre).remove()
        return not self.handles

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and not recomputing():
            call = HookCall(module, args)
            for fn in tuple(self.listeners[True]):
                fn(call)

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if module.training and not recomputing():
            call = HookCall(module, args, output)
            for fn in tuple(self.listeners[False]):
                fn(call)


_HOOKS: weakref.WeakKeyDictionary[nn.Module, _ModuleHooks] = weakref.WeakKeyDictionary()


class Listening:
    """A listener added to a module; :meth:`remove` takes it off (and the module's hook with its last listener)."""

    def __init__(self, module: nn.Module, fn: Listener, pre: bool) -> None:
        self.module, self.fn, self.pre = weakref.ref(module), fn, pre
        hooks = _HOOKS.get(module)
        if hooks is None:
            hooks = _HOOKS[module] = _ModuleHooks(module)
        hooks.add(fn, pre)

    def remove(self) -> None:
        module = self.module()
        hooks = None if module is None else _HOOKS.get(module)
        if hooks is not None and hooks.remove(self.fn, self.pre):
            del _HOOKS[module]  # type: ignore[arg-type]


def listen(module: nn.Module, fn: Listener, *, pre: bool = False) -> Listening:
    """Call ``fn(call)`` after each training forward of ``module`` (``pre=True``: before it)."""
    return Listening(module, fn, pre)
