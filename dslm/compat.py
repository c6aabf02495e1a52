"""Checks at each place where dslm relies on another package's internals (a private method, an
attribute no documentation promises, a class deep in its modules). On a version where the
assumption does not hold, dslm stops with one line naming the package, the installed version and
the tested pin, instead of silently doing something else."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from typing import Any

from dslm.errors import DslmError


def pinned_version(package: str) -> str:
    """The version dslm pins `package` to in pyproject.toml (read from dslm's installed metadata),
    or "?" when dslm is not installed as a distribution."""
    try:
        requirements = importlib.metadata.requires("dslm") or []
    except importlib.metadata.PackageNotFoundError:
        return "?"
    pins = (r.split(";")[0].strip() for r in requirements)
    return next((pin.split("==", 1)[1] for pin in pins if pin.startswith(f"{package}==")), "?")


def require(package: str, assumption: str, holds: bool) -> None:
    """Raises DslmError (one line) unless `holds`: `assumption` about `package` is false here."""
    if holds:
        return
    installed = importlib.metadata.version(package)
    raise DslmError(
        f"{package} {installed}: {assumption} does not hold; dslm relies on it and is tested with "
        f"{package}=={pinned_version(package)} (the pin in pyproject.toml): install that version"
    )


def has_method(obj: Any, name: str, params: tuple[str, ...] = ()) -> bool:
    """Whether `obj.name` is callable and takes parameters named `params` (a check of signature)."""
    method = getattr(obj, name, None)
    if not callable(method):
        return False
    try:
        accepted = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return all(p in accepted for p in params)


def import_attr(package: str, module: str, name: str) -> Any:
    """`module.name` of `package`, or DslmError (one line) when this version has no such thing."""
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        found = None
    require(package, f"{module}.{name} exists", found is not None)
    return found
