"""The one settings loader: command-line flags over the environment over TOML files over defaults.

API
---
``SettingsSource(prefix, env=os.environ, file=None, *, flags=None, defaults=None)``   one program's
    settings.  A dotted key ``"server.port"`` is looked up, first found wins, in

    1. ``flags``: ``{key: value}`` from the command line (:meth:`FlagKeys.values`); None (and False, a
       switch not given) means not given;
    2. the environment: ``<PREFIX>_SERVER_PORT`` (an empty variable counts as unset);
    3. ``file``: a TOML file (a ``Path``), or :class:`SettingsFile` s (a later one wins): ``[server] port``;
    4. ``defaults``: ``{key: value}``.

    Typed getters (the ``default`` argument when no layer has the key):
    ``.text(key, default=None)``, ``.integer(key, default)``, ``.number(key, default)``,
    ``.flag(key, default)`` (true/false, yes/no, on/off, 1/0 in the environment; a real boolean in a file),
    ``.path(key, default=None)`` (a relative path from a file resolves against that file's folder),
    ``.text_list(key, default)`` (a list in a file, comma separated in the environment),
    ``.value(key)`` (the raw value, or None), ``.describe(key)`` (where a value came from, for messages),
    ``.secret(key) -> Secret | None``  from ``<PREFIX>_<KEY>`` or a file named by ``<PREFIX>_<KEY>_FILE`` /
    ``key_file`` (a flag may name the file too); never the value itself from argv or a settings file.
    ``Secret.reveal()`` gives the value; ``repr`` hides it.
``SettingsSource.located(prefix, env=None, *, config=None, config_keys=("config",), flags=None,
    defaults=None)``   the same, with the TOML file named by ``config`` (the ``--config`` flag) or else by
    the first of ``config_keys`` set in the environment (``<PREFIX>_CONFIG``).
``SettingsFile.read(path, *, what="settings file", json_text=False, known=None)``   a file's values
    (TOML, or JSON with ``json_text``); ``known``: the only top-level keys it may hold.
    ``.without(*keys)``: the same file with some keys ignored.
``FlagKeys({dest: key}, convert={dest: function})``   the one place a program says which flag sets which
    key (argparse ``dest`` names); a flag setting several keys (``--listen HOST:PORT``) names a tuple of
    keys and converts its text into a tuple of values.  ``.values(args) -> {key: value}`` (the flags
    given), ``.within(section)`` (the same flags for keys under ``section.``), ``a | b`` (both tables).
``SettingsError(message, reason="SETTINGS_INVALID")``   a ``ValueError``: a missing or malformed value (the
    message names the variable and the file key), ``reason`` SETTINGS_INVALID, SETTINGS_UNREADABLE (a file
    that cannot be read) or SETTINGS_UNKNOWN_KEY (a key the program does not have).

Standard library only (see the package's docstring).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

T = TypeVar("T")

INVALID = "SETTINGS_INVALID"
UNREADABLE = "SETTINGS_UNREADABLE"
UNKNOWN_KEY = "SETTINGS_UNKNOWN_KEY"


class ConfigurationError(Exception):
    """Settings, files or arguments a program cannot run with (a person fixes them; not a bug).  The root
    of every such error in the suite (``provkit.errors`` re-exports it); here because this package is the
    one every program, the emulator included, can import."""


class SettingsError(ConfigurationError, ValueError):
    def __init__(self, message: str, reason: str = INVALID) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Secret:
    value: str = ""

    def reveal(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return "Secret(****)"

    __str__ = __repr__


@dataclass(frozen=True)
class SettingsFile:
    path: Path
    data: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def read(
        cls,
        path: Path,
        *,
        what: str = "settings file",
        json_text: bool = False,
        known: Collection[str] | None = None,
    ) -> SettingsFile:
        try:
            text = path.read_text()
        except OSError as exc:
            raise SettingsError(f"cannot read {what} {path}: {exc.strerror or exc}", UNREADABLE) from exc
        except UnicodeDecodeError as exc:
            raise SettingsError(f"{what} {path} is not text (UTF-8)", INVALID) from exc
        try:
            data = json.loads(text) if json_text else tomllib.loads(text)
        except ValueError as exc:  # tomllib.TOMLDecodeError, json.JSONDecodeError
            kind = "JSON" if json_text else "TOML"
            raise SettingsError(f"{what} {path} is not valid {kind}: {exc}", INVALID) from exc
        if not isinstance(data, dict):
            raise SettingsError(f"{what} {path}: expected a table/object", INVALID)
        unknown = set(data) - set(known) if known is not None else set()
        if unknown:
            raise SettingsError(f"{what} {path}: unknown settings {sorted(unknown)}", UNKNOWN_KEY)
        return cls(path, data)

    def without(self, *keys: str) -> SettingsFile:
        return SettingsFile(self.path, {k: v for k, v in self.data.items() if k not in keys})

    def get(self, key: str) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


@dataclass(frozen=True)
class _Found:
    value: Any
    layer: str  # "flag", "env", "file", "default"
    file: Path | None = None


@dataclass(frozen=True)
class FlagKeys:
    keys: Mapping[str, str | tuple[str, ...]]
    convert: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)

    def values(self, args: object) -> dict[str, Any]:
        """``{key: value}`` of the flags given in ``args`` (an ``argparse.Namespace``)."""
        given: dict[str, Any] = {}
        for dest, key in self.keys.items():
            value = getattr(args, dest, None)
            if value is None or value is False:
                continue
            if dest in self.convert:
                value = self.convert[dest](value)
            if isinstance(key, tuple):
                given.update(zip(key, value, strict=True))
            else:
                given[key] = value
        return given

    def within(self, section: str) -> FlagKeys:
        def under(key: str | tuple[str, ...]) -> str | tuple[str, ...]:
            if isinstance(key, tuple):
                return tuple(f"{section}.{k}" for k in key)
            return f"{section}.{key}"

        return FlagKeys({dest: under(key) for dest, key in self.keys.items()}, self.convert)

    def __or__(self, other: FlagKeys) -> FlagKeys:
        return FlagKeys({**self.keys, **other.keys}, {**self.convert, **other.convert})


class SettingsSource:
    def __init__(
        self,
        prefix: str,
        env: Mapping[str, str] | None = None,
        file: Path | SettingsFile | Sequence[SettingsFile] | None = None,
        *,
        flags: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        self.prefix = prefix.upper().rstrip("_")
        self.env = dict(os.environ if env is None else env)
        if file is None:
            files: tuple[SettingsFile, ...] = ()
        elif isinstance(file, SettingsFile):
            files = (file,)
        elif isinstance(file, Path):
            files = (SettingsFile.read(file),)
        else:
            files = tuple(file)
        self.files = files
        self.flags = {k: v for k, v in (flags or {}).items() if v is not None and v is not False}
        self.defaults = dict(defaults or {})

    @classmethod
    def located(
        cls,
        prefix: str,
        env: Mapping[str, str] | None = None,
        *,
        config: Path | None = None,
        config_keys: Sequence[str] = ("config",),
        flags: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> SettingsSource:
        probe = cls(prefix, env)
        for key in config_keys:
            config = config or probe.path(key)
        return cls(prefix, probe.env, config, flags=flags, defaults=defaults)

    @property
    def file(self) -> Path | None:
        """The settings file read last (the one that wins among files), if any."""
        return self.files[-1].path if self.files else None

    def env_name(self, key: str) -> str:
        return f"{self.prefix}_{key.upper().replace('.', '_').replace('-', '_')}"

    def _find(self, key: str) -> _Found | None:
        if key in self.flags:
            return _Found(self.flags[key], "flag")
        name = self.env_name(key)
        if self.env.get(name):
            return _Found(self.env[name], "env")
        for settings_file in reversed(self.files):
            value = settings_file.get(key)
            if value is not None:
                return _Found(value, "file", settings_file.path)
        if key in self.defaults and self.defaults[key] is not None:
            return _Found(self.defaults[key], "default")
        return None

    def value(self, key: str) -> Any:
        found = self._find(key)
        return None if found is None else found.value

    def describe(self, key: str) -> str:
        """Where ``key`` is set, for a message: ``PREFIX_KEY / key`` (or the command line's flag)."""
        found = self._find(key)
        if found is not None and found.layer == "flag":
            return f"{key} (command line)"
        return f"{self.env_name(key)} / {key}"

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.value(key)
        return default if value is None else str(value)

    def integer(self, key: str, default: int) -> int:
        return self._converted(key, default, int, "an integer")

    def number(self, key: str, default: float) -> float:
        return self._converted(key, default, float, "a number")

    def _converted(self, key: str, default: T, convert: Callable[[Any], T], what: str) -> T:
        value = self.value(key)
        if value is None or value == "":
            return default
        try:
            return convert(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{self.describe(key)} must be {what}, got {value!r}") from None

    def flag(self, key: str, default: bool) -> bool:
        found = self._find(key)
        if found is None:
            return default
        if isinstance(found.value, bool):
            return found.value
        text = str(found.value).strip().lower()
        if found.layer != "file":  # a file has booleans of its own: "yes" there is a mistake
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
        raise SettingsError(f"{self.describe(key)} must be true or false, got {found.value!r}")

    def path(self, key: str, default: Path | None = None) -> Path | None:
        found = self._find(key)
        if found is None or found.value == "":
            return default
        path = Path(str(found.value)).expanduser()
        if found.file is not None and not path.is_absolute():
            path = found.file.parent / path
        return path

    def text_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.value(key)
        if value is None:
            return default
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        if isinstance(value, list | tuple):
            return tuple(str(item) for item in value)
        raise SettingsError(f"{self.describe(key)} must be a list, got {value!r}")

    def secret(self, key: str) -> Secret | None:
        name = self.env_name(key)
        if self.env.get(name):
            return Secret(self.env[name])
        secret_file = self.path(f"{key}_file")
        if secret_file is None:
            return None
        try:
            return Secret(secret_file.read_text().rstrip("\r\n"))
        except OSError as exc:
            raise SettingsError(f"cannot read secret file for {name}: {exc}", UNREADABLE) from exc
