"""Stage plugins: discovery from entry points, dependency order, broken plugins reported."""

from __future__ import annotations

import re
import sys
from importlib.metadata import EntryPoint

import pytest

from ldae_bids.errors import PluginError, UsageError
from ldae_bids.plugins.api import Level, Stage, StageOption
from ldae_bids.plugins.registry import Registry


class A(Stage):
    name = "a"
    level = Level.PARTICIPANT

    def run(self, ctx, unit):
        pass


class B(A):
    name = "b"
    requires = ("a",)


class G(Stage):
    name = "g"
    level = Level.GROUP
    requires = ("b",)

    def run(self, ctx, unit):
        pass


class NoRun(Stage):
    name = "norun"


class BadOptions(A):
    name = "badopts"
    options = {"k": "10"}  # a default, not a StageOption


class Cycle1(A):
    name = "c1"
    requires = ("c2",)


class Cycle2(A):
    name = "c2"
    requires = ("c1",)


def eps(**names: str) -> list[EntryPoint]:
    return [EntryPoint(name, value, "ldae_bids.stages") for name, value in names.items()]


mod = __name__


def test_plan_adds_requirements_in_order():
    reg = Registry(eps(a=f"{mod}:A", b=f"{mod}:B", g=f"{mod}:G"))
    assert [s.name for s in reg.plan("participant", ("b",))] == ["a", "b"]
    assert [s.name for s in reg.plan("participant")] == ["a", "b"]
    # a group stage's participant-level requirement is not run at group level
    assert [s.name for s in reg.plan("group")] == ["g"]
    assert [s.name for s in reg.plan("participant", skip=("a",))] == ["b"]


def test_wrong_level_and_unknown_stage_are_usage_errors():
    reg = Registry(eps(a=f"{mod}:A", g=f"{mod}:G", b=f"{mod}:B"))
    with pytest.raises(UsageError, match="group level"):
        reg.plan("participant", ("g",))
    with pytest.raises(UsageError, match="unknown stage"):
        reg.plan("participant", ("zzz",))


def test_cycle_is_reported():
    reg = Registry(eps(c1=f"{mod}:Cycle1", c2=f"{mod}:Cycle2"))
    with pytest.raises(PluginError, match="cycle"):
        reg.plan("participant")


def test_broken_plugins_do_not_break_the_others(caplog):
    reg = Registry(eps(a=f"{mod}:A", bad="no_such_module_xyz:Stage", norun=f"{mod}:NoRun",
                       notastage=f"{mod}:eps", badopts=f"{mod}:BadOptions"))
    plan = reg.plan("participant")
    assert [s.name for s in plan] == ["a"]
    assert "failed to load" in reg.errors["bad"] and "ModuleNotFoundError" in reg.errors["bad"]
    assert "does not implement run()" in reg.errors["norun"]
    assert "not a subclass" in reg.errors["notastage"]
    assert "options must be None or a dict of option names to StageOption" in reg.errors["badopts"]
    with pytest.raises(PluginError, match="no_such_module_xyz"):
        reg.plan("participant", ("bad",))


def test_broken_installed_distribution_is_named(tmp_path, monkeypatch):
    """A plugin distribution (dist-info on sys.path) whose module fails at import."""
    dist = tmp_path / "broken_plugin-2.5.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 2.5\n")
    (dist / "entry_points.txt").write_text("[ldae_bids.stages]\nbroken = broken_plugin_mod:Stage\n")
    (tmp_path / "broken_plugin_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert "broken" in reg.names and "example-qc" in reg.names
    infos = {i.name: i for i in reg.info()}
    assert infos["broken"].error and "broken-plugin 2.5" in infos["broken"].error
    assert "boom at import" in infos["broken"].error
    assert infos["example-qc"].error is None and infos["example-qc"].distribution == "ldae-bids-example"
    sys.modules.pop("broken_plugin_mod", None)


def test_builtin_stages_register_through_entry_points():
    reg = Registry()
    for name in ("preprocess", "embed", "reconstruct", "probe", "collect-embeddings", "collect-qc"):
        assert name in reg.names
        assert reg.distribution(name)[0] == "ldae-bids"


def test_for_each_runs_on_host_threads_in_order_and_raises_the_first_error(tmp_path):
    import threading
    import time

    from ldae_bids.config import build_settings
    from ldae_bids.plugins.api import StageContext

    def ctx(nprocs):
        settings = build_settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                                  nprocs=nprocs)
        return StageContext(settings, None, None, type("S", (Stage,), {"name": "s"})())

    threads, ran = [], []

    def slow_square(i):
        time.sleep(0.05)
        threads.append(threading.current_thread().name)
        ran.append(i)
        if i in (1, 3):
            raise ValueError(f"item {i}")
        return i * i

    assert ctx(4).for_each(lambda i: i * i, range(5)) == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError, match="item 1"):
        ctx(4).for_each(slow_square, range(5))
    assert sorted(ran) == [0, 1, 2, 3, 4]  # every item ran before the error was raised
    assert len(set(threads)) > 1 and all(t.startswith("ldae-s") for t in threads)
    threads.clear()
    ran.clear()
    with pytest.raises(ValueError, match="item 1"):  # one thread: the calling one, in order, stops at the error
        ctx(1).for_each(slow_square, range(5))
    assert ran == [0, 1] and set(threads) == {threading.current_thread().name}


# ------------------------------------------------------------------------- declared --stage-options
class WithOptions(A):
    name = "opts"
    options = {"mode": StageOption("how", "fast", ("fast", "slow")),
               "k": StageOption("neighbours", "10", kind=int, minimum=2)}


def test_declared_options_are_checked_and_typed(tmp_path):
    from ldae_bids.config import build_settings

    reg = Registry(eps(opts=f"{mod}:WithOptions", a=f"{mod}:A"))
    reg.check_options({"opts": {"mode": "slow", "k": "3"}, "a": {"anything": "goes"}})  # A declares none
    for given, says in (({"opts": {"mdoe": "slow"}}, "stage 'opts' has no option 'mdoe' (its options: k, mode)"),
                        ({"opts": {"mode": "quick"}}, "--stage-option opts.mode=quick: give one of fast, slow"),
                        ({"opts": {"k": "ten"}}, "--stage-option opts.k=ten: not a whole number"),
                        ({"opts": {"k": "1"}}, "--stage-option opts.k=1: must be at least 2"),
                        ({"nope": {"x": "1"}}, "no stage 'nope' is installed")):
        with pytest.raises(UsageError, match=re.escape(says)):
            reg.check_options(given)

    def settings(**opts):
        return build_settings(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant",
                              stage_options={"opts": opts} if opts else None)

    assert WithOptions.option_value(settings(), "k") == 10 and WithOptions.option_value(settings(k="4"), "k") == 4
    assert WithOptions.option_value(settings(), "mode") == "fast"
    assert A.option_value(settings(), "free", "dflt") == "dflt"  # undeclared options: raw strings
    with pytest.raises(PluginError, match="'opts' reads option 'other'"):  # a stage bug, not the user's
        WithOptions.option_value(settings(), "other")
    info = {i.name: i for i in reg.info()}
    assert dict(info["opts"].options)["k"] == "N, default 10: neighbours" and info["a"].options == ()


def test_builtin_stages_declare_their_options():
    reg = Registry()
    for name in ("preprocess", "embed", "reconstruct", "manipulate", "fill-missing-sessions", "probe",
                 "collect-embeddings", "collect-qc"):
        assert reg.load(name).options is not None, name
    with pytest.raises(UsageError, match="stage 'embed' has no option 'steps'"):
        reg.check_options({"embed": {"steps": "10"}})
    with pytest.raises(UsageError, match="fill-missing-sessions.evaluate=true: give one of yes, no"):
        reg.check_options({"fill-missing-sessions": {"evaluate": "true"}})
