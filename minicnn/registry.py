"""Keras' ``get(identifier)`` rule, in one place, for losses, metrics, initializers, optimizers.

An identifier is None, an instance of the family's base class (returned as is), a subclass
(instantiated with ``kwargs``), a ``{"class_name": ..., "config": {...}}`` dict (rebuilt with
``from_config``), a name (a class name, or an alias matched case-insensitively with '-' read as
'_'), or any other callable (returned as is, when the family allows it).
"""
from __future__ import annotations


def _module(kind: str) -> str:
    """The module a family's ``get`` lives in: 'losses' for 'loss', 'metrics' for 'metric'."""
    return kind + ("es" if kind.endswith("s") else "s")


def find_class(name: str, kind: str, classes: dict, aliases: dict):
    """The class called ``name`` (exact class name first, then an alias); ValueError otherwise."""
    cls = classes.get(name) or aliases.get(str(name).lower().replace("-", "_"))
    if cls is None:
        raise ValueError(f"{_module(kind)}.get: unknown {kind} {name!r}; known: {sorted(aliases)} "
                         f"or a class name {sorted(classes)}")
    return cls


def resolve(identifier, kind: str, base: type, classes: dict, aliases: dict,
            allow_callable: bool = True, **kwargs):
    """The object ``identifier`` names (see the module docstring); ``kwargs`` go to a constructor."""
    if identifier is None or isinstance(identifier, base):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, base):
        return identifier(**kwargs)
    if isinstance(identifier, dict):
        if "class_name" not in identifier:
            raise ValueError(f"{_module(kind)}.get: a dict identifier needs 'class_name', got {identifier!r}")
        cls = find_class(identifier["class_name"], kind, classes, aliases)
        return cls.from_config({**(identifier.get("config") or {}), **kwargs})
    if isinstance(identifier, str):
        return find_class(identifier, kind, classes, aliases)(**kwargs)
    if allow_callable and callable(identifier):
        return identifier
    raise TypeError(f"{_module(kind)}.get: expected a name, a config dict, a {base.__name__} or a "
                    f"callable, got {type(identifier).__name__}")


class Configurable:
    """Base of the objects ``resolve`` rebuilds: ``get_config()`` gives the constructor's
    arguments, ``from_config(config)`` calls the constructor with them, and the repr shows them."""

    def get_config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"
