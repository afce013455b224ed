"""Stage discovery from the ``ldae_bids.stages`` entry-point group.

Plugins load only from installed entry points (never from paths given at run time),
lazily, by name. A plugin that fails to import or declares nonsense is reported with
its distribution name and left out; the other stages go on (style.md #7).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from ldae_bids.errors import PluginError, UsageError
from ldae_bids.plugins.api import Level, Stage, StageOption

GROUP = "ldae_bids.stages"
log = logging.getLogger("ldae_bids")


@dataclass(frozen=True)
class StageInfo:
    name: str
    level: str
    version: str
    distribution: str
    dist_version: str
    description: str
    default: bool
    requires: tuple[str, ...]
    error: str | None = None
    options: tuple[tuple[str, str], ...] = ()  # (key, description) of each declared --stage-option


def _dist(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "?"
    return dist.metadata["Name"], dist.version


class Registry:
    """The installed stages, loaded on demand."""

    def __init__(self, eps: list[EntryPoint] | None = None):
        if eps is None:
            eps = list(entry_points(group=GROUP))
        self._eps: dict[str, EntryPoint] = {}
        for ep in eps:
            if ep.name in self._eps:
                other, _ = _dist(self._eps[ep.name])
                log.warning("stage %r is declared twice (%s and %s): keeping the first", ep.name, other,
                            _dist(ep)[0])
                continue
            self._eps[ep.name] = ep
        self._loaded: dict[str, type[Stage]] = {}
        self.errors: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._eps)

    def distribution(self, name: str) -> tuple[str, str]:
        return _dist(self._eps[name])

    def load(self, name: str) -> type[Stage]:
        """The stage class for ``name``; :class:`PluginError` names the culprit package."""
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._eps:
            raise UsageError(f"unknown stage {name!r}; installed: {', '.join(self.names) or 'none'}")
        ep = self._eps[name]
        dist, version = _dist(ep)
        try:
            cls = ep.load()
        except Exception as exc:  # any import-time failure of third-party code
            msg = f"stage {name!r} from {dist} {version} failed to load: {type(exc).__name__}: {exc}"
            self.errors[name] = msg
            raise PluginError(msg) from None
        problem = _check(cls, name)
        if problem:
            msg = f"stage {name!r} from {dist} {version} is not valid: {problem}"
            self.errors[name] = msg
            raise PluginError(msg)
        self._loaded[name] = cls
        return cls

    def try_load(self, name: str) -> type[Stage] | None:
        try:
            return self.load(name)
        except PluginError as exc:
            log.error("%s", exc)
            return None

    def info(self) -> list[StageInfo]:
        """One row per installed stage (broken ones included, with their error)."""
        rows = []
        for name in self.names:
            dist, dver = self.distribution(name)
            try:
                cls = self.load(name)
            except PluginError as exc:
                rows.append(StageInfo(name, "?", "?", dist, dver, "", False, (), str(exc)))
                continue
            rows.append(StageInfo(name, cls.level.value, cls.version, dist, dver, cls.description,
                                  cls.default, tuple(cls.requires),
                                  options=tuple((k, o.describe()) for k, o in sorted((cls.options or {}).items()))))
        return rows

    def check_options(self, given: dict[str, dict[str, str]]) -> None:
        """Refuse ``--stage-option``s for stages that are not installed, and unknown keys or bad values for
        stages that declare their options (:attr:`Stage.options`), before the run starts."""
        for stage, opts in given.items():
            if stage not in self._eps:
                first = next(iter(opts), "KEY")
                raise UsageError(f"--stage-option {stage}.{first}=...: no stage {stage!r} is installed "
                                 f"(installed: {', '.join(self.names) or 'none'})")
            self.load(stage).check_options(opts)

    def plan(self, level: str, wanted: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> list[type[Stage]]:
        """Stages to run at ``level``, in dependency order.

        With ``wanted`` empty, every default stage of the level that loads. Stages a
        wanted stage requires at the same level are added. Broken default plugins are
        logged and left out; a broken stage asked for by name is an error.
        """
        lvl = Level(level)
        chosen: dict[str, type[Stage]] = {}
        if wanted:
            for name in wanted:
                cls = self.load(name)
                if cls.level != lvl:
                    raise UsageError(f"stage {name!r} runs at the {cls.level.value} level, not {level}")
                chosen[name] = cls
        else:
            for name in self.names:
                cls = self.try_load(name)
                if cls is not None and cls.level == lvl and cls.default:
                    chosen[name] = cls
        # add same-level requirements
        queue = list(chosen)
        while queue:
            for req in chosen[queue.pop()].requires:
                if req in chosen or req not in self._eps:
                    if req not in self._eps:
                        raise PluginError(f"stage requires {req!r}, which is not installed")
                    continue
                cls = self.load(req)
                if cls.level == lvl:
                    chosen[req] = cls
                    queue.append(req)
        for name in skip:
            chosen.pop(name, None)
        return _toposort(chosen)


def _check(cls: object, name: str) -> str | None:
    if not isinstance(cls, type) or not issubclass(cls, Stage):
        return "not a subclass of ldae_bids.plugins.api.Stage"
    if cls.name != name:
        return f"its name attribute is {cls.name!r}, the entry point says {name!r}"
    if not isinstance(cls.level, Level):
        return "level must be Level.PARTICIPANT or Level.GROUP"
    if cls.run is Stage.run:
        return "it does not implement run()"
    if cls.options is not None and not (isinstance(cls.options, dict) and all(
            isinstance(k, str) and isinstance(v, StageOption) for k, v in cls.options.items())):
        return "options must be None or a dict of option names to StageOption"
    return None


def _toposort(stages: dict[str, type[Stage]]) -> list[type[Stage]]:
    order: list[type[Stage]] = []
    state: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise PluginError(f"stage dependency cycle: {' -> '.join(path + (name,))}")
        state[name] = 1
        for req in sorted(stages[name].requires):
            if req in stages:
                visit(req, path + (name,))
        state[name] = 2
        order.append(stages[name])

    for name in sorted(stages):
        visit(name, ())
    return order
