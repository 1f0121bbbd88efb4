"""Name tables, identifier resolution and Keras-format serialization.

One mechanism serves :mod:`batchnorm.initializers`, :mod:`batchnorm.regularizers`
and :mod:`batchnorm.constraints`. Each of those modules owns a :class:`Registry`
of its built-in classes and exposes ``get`` and ``serialize`` on top of it.

Resolution is closed: a name or a serialized dict can only select one of the
built-in classes registered here. Nothing named in a configuration is ever
imported, looked up as an attribute of a module, or evaluated.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import operator
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["Configurable", "Registry", "check_int", "check_real"]

T = TypeVar("T", bound="Configurable")

_DICT_KEYS = frozenset({"module", "class_name", "config", "registered_name"})
# Keras adds this key to objects shared inside a saved model; it carries no
# information we need, so it is accepted and ignored.
_IGNORED_DICT_KEYS = frozenset({"shared_object_id"})


class Configurable:
    """Base of every built-in object: a config of plain values, and back.

    A subclass keeps its constructor arguments as attributes and returns them
    from :meth:`get_config`; :meth:`from_config` calls the constructor with
    them, so ``cls.from_config(obj.get_config())`` rebuilds an equal object.
    """

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments as a JSON-serializable dict."""
        return {}

    @classmethod
    def from_config(cls: type[T], config: Mapping[str, Any]) -> T:
        """Build an object from the output of :meth:`get_config`.

        Args:
            config: Keyword arguments of the constructor.

        Raises:
            TypeError: ``config`` is not a mapping.
            ValueError: ``config`` has keys the constructor does not take
                (the message names them and the accepted keys).
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_config expects a dict, received config={config!r}")
        accepted = _keyword_names(cls)
        unknown = sorted(set(config) - accepted)
        if unknown:
            raise ValueError(
                f"{cls.__name__} config has unknown keys {unknown}; "
                f"accepted keys: {sorted(accepted)}. Received config={dict(config)!r}"
            )
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _keyword_names(cls: type) -> set[str]:
    """Names of the keyword arguments that ``cls(...)`` accepts."""
    parameters = inspect.signature(cls).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in kinds}


class Registry(Generic[T]):
    """The built-in classes of one kind of object, by every name Keras gives them.

    Args:
        kind: Singular noun used in messages and in the Keras module name,
            e.g. ``"initializer"`` for module ``"keras.initializers"``.
        base: Base class of the built-ins; instances of it (and of user
            subclasses) are returned unchanged by :meth:`get`.
        allow_none: Whether :meth:`get` maps ``None`` to ``None``; when
            False, ``None`` is rejected with a ``TypeError``.
        unsupported: Keras names of this kind that this package does not
            implement, so that the error can say so rather than "unknown".
    """

    def __init__(
        self,
        kind: str,
        base: type[T],
        *,
        allow_none: bool = True,
        unsupported: Iterable[str] = (),
    ) -> None:
        self.kind = kind
        self.base = base
        self.module = f"keras.{kind}s"
        self.allow_none = allow_none
        self.unsupported = frozenset(unsupported)
        self._by_name: dict[str, type[T]] = {}
        self._classes: set[type[T]] = set()

    def register(self, *aliases: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register a class under its own name and ``aliases``."""

        def decorate(cls: type[T]) -> type[T]:
            for name in (cls.__name__, *aliases):
                if name in self._by_name:
                    raise RuntimeError(f"{self.kind} name {name!r} registered twice")
                self._by_name[name] = cls
            self._classes.add(cls)
            return cls

        return decorate

    @property
    def classes(self) -> frozenset[type[T]]:
        """The registered classes."""
        return frozenset(self._classes)

    @property
    def names(self) -> list[str]:
        """Every accepted name (class names and aliases), sorted."""
        return sorted(self._by_name)

    # -- resolution ---------------------------------------------------------

    def get(self, identifier: Any, *, argument: str | None = None) -> Any:
        """Resolve an identifier to an object (see the ``get`` of each module).

        Args:
            identifier: ``None``, a name, a Keras serialized dict, an object of
                ``base``, a class (instantiated with no arguments, as Keras
                does) or any other callable (returned as is).
            argument: Name of the argument being resolved (e.g.
                ``"beta_initializer"``), used in error messages; defaults to
                ``"<kind> identifier"``.

        Raises:
            TypeError: ``identifier`` has a type that cannot be resolved.
            ValueError: an unknown name, a malformed dict, or a dict that asks
                for something other than a built-in.
        """
        label = argument or f"{self.kind} identifier"
        if identifier is None:
            if self.allow_none:
                return None
            raise TypeError(f"Invalid {label}=None: expected a name, a config dict or a callable")
        if isinstance(identifier, str):
            return self._lookup(identifier, label, identifier, "name")()
        if isinstance(identifier, Mapping):
            return self._from_dict(identifier, label)
        received = identifier
        if isinstance(identifier, type):
            identifier = identifier()  # as Keras: a class stands for its default instance
        if isinstance(identifier, self.base):
            return identifier
        if isinstance(identifier, Configurable):
            raise TypeError(f"Invalid {label}={received!r}: {type(identifier).__name__} is not one of the {self.kind}s")
        if callable(identifier):
            return identifier
        raise TypeError(
            f"Invalid {label}={received!r} (type {type(received).__name__}): "
            "expected None, a name, a Keras config dict or a callable"
        )

    def _lookup(self, name: str, label: str, received: Any, what: str) -> type[T]:
        """Return the class registered under ``name``, or raise ``ValueError``."""
        cls = self._by_name.get(name)
        if cls is not None:
            return cls
        if name in self.unsupported:
            reason = f"{name!r} is a Keras {self.kind} that batchnorm does not implement"
        else:
            reason = f"unknown {self.kind} {what} {name!r}"
        raise ValueError(f"Invalid {label}={received!r}: {reason}. Known names: {', '.join(self.names)}")

    def _from_dict(self, spec: Mapping[str, Any], label: str) -> T:
        """Build a built-in object from a Keras serialized dict."""

        def fail(reason: str) -> ValueError:
            return ValueError(f"Invalid {label}={dict(spec)!r}: {reason}")

        extra = sorted(set(spec) - _DICT_KEYS - _IGNORED_DICT_KEYS, key=str)
        if extra:
            raise fail(f"unexpected keys {extra}; expected {sorted(_DICT_KEYS)}")
        class_name = spec.get("class_name")
        if not isinstance(class_name, str):
            raise fail("'class_name' must be a string naming a built-in " + self.kind)
        if "module" in spec and not self._is_own_module(spec["module"]):
            raise fail(
                f"module {spec['module']!r} is not {self.module!r}; only built-in "
                f"{self.kind}s can be loaded (nothing named in a config is imported)"
            )
        registered = spec.get("registered_name")
        if registered is not None and registered != class_name:
            raise fail(
                f"registered_name {registered!r} names a custom object; only built-in "
                f"{self.kind}s can be loaded (nothing named in a config is imported)"
            )
        cls = self._lookup(class_name, label, dict(spec), "class_name")
        config = spec.get("config")
        try:
            return cls.from_config({} if config is None else config)
        except (TypeError, ValueError) as error:  # say which argument held the bad config
            raise type(error)(f"Invalid {label}={dict(spec)!r}: {error}") from error

    def _is_own_module(self, module: Any) -> bool:
        """Whether ``module`` is a Keras module path for this kind of object."""
        if not isinstance(module, str):
            return False
        return any(module == root or module.startswith(root + ".") for root in (self.module, f"keras.src.{self.kind}s"))

    # -- serialization ------------------------------------------------------

    def serialize(self, obj: Any) -> dict[str, Any] | None:
        """Serialize an object to Keras 3's dict format (see each module's ``serialize``).

        Raises:
            TypeError: ``obj`` is not callable, or a foreign object's
                ``get_config()`` is not a JSON-serializable dict.
        """
        if obj is None:
            return None
        if type(obj) in self._classes:
            return {
                "module": self.module,
                "class_name": type(obj).__name__,
                "config": obj.get_config(),
                "registered_name": None,
            }
        if not callable(obj):
            raise TypeError(
                f"Cannot serialize {obj!r} (type {type(obj).__name__}) as a {self.kind}: expected None or a callable"
            )
        name = _qualified_name(obj)
        get_config = getattr(obj, "get_config", None)
        config = get_config() if callable(get_config) else {}
        if not isinstance(config, dict):
            raise TypeError(
                f"Cannot serialize {self.kind} {name}: get_config() must return a dict, received {config!r}"
            )
        try:
            json.dumps(config)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"Cannot serialize {self.kind} {name}: its get_config() returned "
                f"{config!r}, which is not JSON-serializable ({error})"
            ) from None
        return {"module": None, "class_name": name, "config": config, "registered_name": name}


def _qualified_name(obj: Any) -> str:
    """``module.QualifiedName`` of a function or class, else of the object's class."""
    named = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)
    target = obj if isinstance(obj, named) else type(obj)
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", type(target).__qualname__)
    return f"{module}.{qualname}" if module else qualname


# -- argument checks shared by the three modules ------------------------------


def check_real(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> int | float:
    """Check that ``value`` is a finite real number within bounds, and return it.

    Python ``int`` and ``float`` are returned unchanged (so configs keep the
    type they were given, as Keras's do); other real scalars (e.g. NumPy's)
    become the Python number of the same value.

    Args:
        value: The number to check; ``bool`` is rejected.
        name: Argument name, for the error message.
        minimum: Lowest accepted value, inclusive unless ``strict_minimum``.
        maximum: Highest accepted value, inclusive.
        strict_minimum: Whether ``minimum`` itself is rejected.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is not finite or is out of bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Invalid value for argument {name}: expected a real number, "
            f"received {name}={value!r} (type {type(value).__name__})"
        )
    if not isinstance(value, (int, float)):
        value = value.item() if hasattr(value, "item") else float(value)
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if strict_minimum else '>='} {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    below = minimum is not None and (value <= minimum if strict_minimum else value < minimum)
    above = maximum is not None and value > maximum
    if not math.isfinite(value) or below or above:
        wanted = " ".join(["a finite number", " and ".join(bounds)]).strip()
        raise ValueError(f"Invalid value for argument {name}: expected {wanted}, received {name}={value!r}")
    return value


def check_int(value: Any, name: str) -> int:
    """Return ``value`` as a Python ``int``; ``bool`` and non-integers raise ``TypeError``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"Invalid value for argument {name}: expected an integer, "
            f"received {name}={value!r} (type {type(value).__name__})"
        ) from None
