"""A safe encoding of a fitted method's state: Python objects <-> a tree that `torch.save` writes and
`torch.load(weights_only=True)` reads back, so an exported artefact holds data and never pickled code.

The tree holds only None, bool, int, float, str, lists, str-keyed dicts and tensors. Every other value
is a node, a dict with a "$" key naming its kind:

    tensor / param        a tensor (detached) or an nn.Parameter, with its requires_grad flag
    list / tuple / set / dict / odict
                          containers; dict keys are encoded too (any encodable key)
    generator             a torch.Generator: its device and `get_state()` (draws continue where they were)
    device / dtype / size / ndarray / npscalar / enum
                          torch.device, torch.dtype, torch.Size, numpy arrays and scalars, enum
                          members (by name);
                          a subclass of str, int or float (torch's version string) is stored as its value
    class / function      a reference "module:qualname" to a class or a module-level function
    object                an instance: its class reference and its encoded `__dict__` (nn.Modules too:
                          parameters, buffers, submodules and flags are all in `__dict__`)
    ref                   the n-th object encoded before (shared objects stay shared, cycles end)

Safety: a reference resolves only inside ALLOWED_PACKAGES (this project's packages, torch.nn, and
laplace-torch and curvlinops, whose objects laplace-torch's method holds), must be defined in the module
it names (no `bench.x:os.system` through an import), and decoding creates objects with `cls.__new__` and
fills `__dict__` (nn.Module through its `__setstate__`), running no constructor or other code of the file.
"""

from __future__ import annotations

import enum
import importlib
import types
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.errors import BenchError

# top-level packages (and torch.nn) whose classes and functions an artefact may name
ALLOWED_PACKAGES = ("bench", "methods", "backbones", "datasets", "torch.nn", "laplace", "curvlinops")
_PRIMITIVES = (type(None), bool, int, float, str)


class StateError(BenchError):
    """A value that cannot be encoded or a tree that cannot be decoded (one line, naming where)."""


def _allowed(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in ALLOWED_PACKAGES)


def reference(obj: Any, where: str = "state") -> str:
    """'module:qualname' of a class or module-level function of an allowed package (else StateError)."""
    module, qual = getattr(obj, "__module__", None) or "", getattr(obj, "__qualname__", "")
    if "<" in qual:
        raise StateError(f"cannot export {where}: {qual} is a lambda or a local function (not importable)")
    if not _allowed(module):
        raise StateError(
            f"cannot export {where}: {module}.{qual} is not from an allowed package "
            f"({', '.join(ALLOWED_PACKAGES)})"
        )
    return f"{module}:{qual}"


def resolve(ref: str) -> Any:
    """The class or function named by `reference`, after checking the package and that it is defined
    in that module (StateError otherwise)."""
    module, _, qual = str(ref).partition(":")
    if not (qual and _allowed(module)):
        raise StateError(
            f"artefact names {ref!r}, outside the allowed packages ({', '.join(ALLOWED_PACKAGES)})"
        )
    try:
        obj: Any = importlib.import_module(module)
        for i, part in enumerate(qual.split(".")):
            obj = getattr(obj, part)
            if i < qual.count(".") and not isinstance(obj, type):  # only nested classes on the way
                raise AttributeError(part)
    except (ImportError, AttributeError):
        raise StateError(f"artefact names {ref!r}, which this bench version does not have") from None
    if getattr(obj, "__module__", None) != module or not isinstance(obj, (type, types.FunctionType)):
        raise StateError(f"artefact names {ref!r}, which is not a class or function defined there")
    return obj


class _Encoder:
    def __init__(self, only: dict[int, set[str]] | None = None) -> None:
        self.only = only or {}  # id(object) -> the attributes of it to encode (all when absent)
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps encoded objects alive, so their ids stay unique

    def _shared(self, obj: Any) -> dict | None:
        i = self.memo.get(id(obj))
        return None if i is None else {"$": "ref", "i": i}

    def _register(self, obj: Any) -> int:
        self.memo[id(obj)] = len(self.keep)
        self.keep.append(obj)
        return self.memo[id(obj)]

    def encode(self, obj: Any, where: str) -> Any:
        if type(obj) in _PRIMITIVES:
            return obj
        if (ref := self._shared(obj)) is not None:
            return ref
        node = self._node(obj, where)
        return node

    def _node(self, obj: Any, where: str) -> Any:  # noqa: C901 - one branch per kind, in the docstring's order
        if isinstance(obj, torch.Tensor):
            if type(obj) not in (torch.Tensor, nn.Parameter):
                raise StateError(f"cannot export {where}: tensor subclass {type(obj).__name__}")
            i = self._register(obj)
            kind = "param" if isinstance(obj, nn.Parameter) else "tensor"
            return {"$": kind, "id": i, "t": obj.detach(), "grad": bool(obj.requires_grad)}
        if isinstance(obj, torch.Size):
            return {"$": "size", "v": [int(n) for n in obj]}
        if isinstance(obj, (list, tuple, set, frozenset, dict)):
            return self._container(obj, where)
        if isinstance(obj, torch.Generator):
            i = self._register(obj)
            return {"$": "generator", "id": i, "device": str(obj.device), "state": obj.get_state()}
        if isinstance(obj, torch.device):
            return {"$": "device", "v": str(obj)}
        if isinstance(obj, torch.dtype):
            return {"$": "dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise StateError(f"cannot export {where}: numpy array of Python objects")
            return {"$": "ndarray", "t": torch.from_numpy(np.ascontiguousarray(obj).copy())}
        if isinstance(obj, enum.Enum):
            return {"$": "enum", "class": reference(type(obj), where), "name": obj.name}
        if isinstance(obj, np.generic):
            return {"$": "npscalar", "dtype": obj.dtype.str, "v": obj.item()}
        if isinstance(
            obj, _PRIMITIVES
        ):  # a subclass of str / int / float (e.g. torch's TorchVersion): its value
            return next(t for t in (bool, int, float, str) if isinstance(obj, t))(obj)
        if isinstance(obj, type):
            return {"$": "class", "ref": reference(obj, where)}
        if isinstance(obj, types.FunctionType):
            return {"$": "function", "ref": reference(obj, where)}
        if hasattr(obj, "__dict__") and not isinstance(obj, (types.ModuleType, types.MethodType)):
            cls = reference(type(obj), where)
            i = self._register(obj)
            state = vars(obj)
            if id(obj) in self.only:
                state = {k: v for k, v in state.items() if k in self.only[id(obj)]}
            return {
                "$": "object",
                "id": i,
                "class": cls,
                "state": self._container(state, where, register=False),
            }
        raise StateError(
            f"cannot export {where}: a {type(obj).__module__}.{type(obj).__qualname__} "
            "is not a tensor, number, string, container or object"
        )

    def _container(self, obj: Any, where: str, register: bool = True) -> dict:
        i = self._register(obj) if register else None
        if isinstance(obj, dict):
            kind = "odict" if isinstance(obj, OrderedDict) else "dict"
            items = [[self.encode(k, f"{where} key"), self.encode(v, f"{where}.{k}")] for k, v in obj.items()]
            return {"$": kind, "id": i, "items": items}
        kind = {list: "list", tuple: "tuple", set: "set", frozenset: "set"}.get(type(obj))
        if kind is None:  # a namedtuple or other subclass: not a plain container
            raise StateError(f"cannot export {where}: container subclass {type(obj).__qualname__}")
        return {"$": kind, "id": i, "items": [self.encode(v, f"{where}[{j}]") for j, v in enumerate(obj)]}


def encode(obj: Any, where: str = "state", only: dict[int, set[str]] | None = None) -> Any:
    """The tree of `obj` (module docstring); StateError naming the first value that cannot be encoded.
    `only`: id(object) -> the names of its attributes to keep (the others are left out)."""
    return _Encoder(only).encode(obj, where)


class _Decoder:
    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}

    def decode(self, node: Any) -> Any:
        if isinstance(node, _PRIMITIVES):
            return node
        if not isinstance(node, dict) or "$" not in node:
            raise StateError(f"artefact state holds an unexpected {type(node).__name__}")
        kind = node["$"]
        fn = getattr(self, f"_{kind}", None)
        if fn is None:
            raise StateError(f"artefact state holds an unknown node kind {kind!r}")
        return fn(node)

    def _put(self, node: dict, obj: Any) -> Any:
        if node.get("id") is not None:
            self.memo[node["id"]] = obj
        return obj

    def _ref(self, node: dict) -> Any:
        if node["i"] not in self.memo:
            raise StateError(f"artefact state refers to object {node['i']} before it is defined")
        return self.memo[node["i"]]

    def _tensor(self, node: dict) -> torch.Tensor:
        t = node["t"]
        return self._put(node, t.requires_grad_(True) if node["grad"] else t)

    def _param(self, node: dict) -> nn.Parameter:
        return self._put(node, nn.Parameter(node["t"], requires_grad=bool(node["grad"])))

    def _list(self, node: dict) -> list:
        out = self._put(node, [])
        out.extend(self.decode(v) for v in node["items"])
        return out

    def _tuple(self, node: dict) -> tuple:
        return self._put(node, tuple(self.decode(v) for v in node["items"]))

    def _set(self, node: dict) -> set:
        return self._put(node, {self.decode(v) for v in node["items"]})

    def _dict(self, node: dict, cls: type = dict) -> dict:
        out = self._put(node, cls())
        for k, v in node["items"]:
            out[self.decode(k)] = self.decode(v)
        return out

    def _odict(self, node: dict) -> OrderedDict:
        return self._dict(node, OrderedDict)

    def _generator(self, node: dict) -> torch.Generator:
        g = torch.Generator(device=node["device"])
        g.set_state(node["state"])
        return self._put(node, g)

    def _device(self, node: dict) -> torch.device:
        return torch.device(node["v"])

    def _size(self, node: dict) -> torch.Size:
        return torch.Size(node["v"])

    def _dtype(self, node: dict) -> torch.dtype:
        dt = getattr(torch, str(node["v"]), None)
        if not isinstance(dt, torch.dtype):
            raise StateError(f"artefact state names an unknown dtype {node['v']!r}")
        return dt

    def _ndarray(self, node: dict) -> np.ndarray:
        return node["t"].numpy()

    def _npscalar(self, node: dict) -> np.generic:
        return np.dtype(node["dtype"]).type(node["v"])

    def _enum(self, node: dict) -> enum.Enum:
        cls = resolve(node["class"])
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise StateError(f"artefact names {node['class']!r} as an enum, but it is not one")
        return cls[node["name"]]

    def _class(self, node: dict) -> type:
        return resolve(node["ref"])

    def _function(self, node: dict) -> Any:
        return resolve(node["ref"])

    def _object(self, node: dict) -> Any:
        cls = resolve(node["class"])
        if not isinstance(cls, type):
            raise StateError(f"artefact names {node['class']!r} as a class, but it is a function")
        obj = self._put(node, cls.__new__(cls))
        state = self._dict(node["state"])
        if isinstance(obj, nn.Module):
            nn.Module.__setstate__(obj, state)  # fills hook dicts a newer torch adds
        else:
            obj.__dict__.update(state)
        return obj


def decode(tree: Any) -> Any:
    """The objects of a tree made by `encode` (StateError on a malformed tree or a disallowed reference)."""
    try:
        return _Decoder().decode(tree)
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise StateError(f"artefact state is malformed ({type(e).__name__}: {e})") from None


def objects_in(obj: Any) -> list[Any]:
    """Every object reachable from `obj` through containers and instance attributes (tensors, arrays,
    classes and functions are leaves; values `encode` would refuse are walked where possible, never raised
    on): the exporter saves the generators' states among them before the check's predictions draw, and
    watches which attributes of the others predict reads."""
    seen: set[int] = set()
    found: list[Any] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, _PRIMITIVES + (torch.Tensor, np.ndarray, type, types.FunctionType)) or id(o) in seen:
            continue
        seen.add(id(o))
        found.append(o)
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, (types.ModuleType, torch.Generator)):
            stack.extend(vars(o).values())
    return found
