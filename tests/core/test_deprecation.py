"""Import paths that moved in 0.2 keep working for one release, each with a FutureWarning that
names the new path."""

from __future__ import annotations

import importlib
import sys

import pytest

from freecure.core.deprecation import MOVED_MODULES


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_a_moved_module_still_imports_with_a_warning(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning, match=f"{old} moved to {MOVED_MODULES[old][0]}"):
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED_MODULES[old][0])
    public = [
        name for name in vars(new) if not name.startswith("_") and getattr(new, name).__class__.__name__ != "module"
    ]
    assert public and all(getattr(module, name) is getattr(new, name) for name in public)


def test_old_names_of_split_modules_resolve_to_their_new_homes(monkeypatch):
    for old in ("freecure.fasa", "freecure.sampling"):
        monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning):
        from freecure.fasa import FasaConfig, foundation_aware_self_attention
        from freecure.sampling import Guidance, rofa_pass, same_pass
    from freecure.attention.fasa import foundation_aware_self_attention as processor
    from freecure.core.guidance import Guidance as guidance
    from freecure.stages.fasa import FasaConfig as config
    from freecure.stages.rofa import rofa_pass as rofa
    from freecure.stages.sampling import same_pass as same

    assert (FasaConfig, foundation_aware_self_attention, Guidance, rofa_pass, same_pass) == (
        config,
        processor,
        guidance,
        rofa,
        same,
    )


@pytest.mark.parametrize(
    "package, name, new",
    [
        ("freecure.backends.photomaker", "TRIGGER_WORD", "freecure.backends.photomaker.backend"),
        ("freecure.backends.pulid", "LICENSE", "freecure.backends.pulid.sdxl"),
        ("freecure.backends.base", "PD", "freecure.core.conditioning"),
        ("freecure.pipeline", "BlankImageError", "freecure.core.errors"),
        ("freecure.families", "image_ids", "freecure.families.flux"),
        ("freecure.attention", "AttentionStore", "freecure.attention.capture"),
    ],
)
def test_a_package_that_kept_its_name_forwards_its_former_names(package, name, new):
    module = importlib.import_module(package)
    with pytest.warns(FutureWarning, match=f"{package}.{name} moved to"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


def test_from_cli_is_the_former_name_of_from_options():
    from freecure.backends import Backend

    class Built(Backend):
        name = "built-test"

        @classmethod
        def from_options(cls, args):
            return ("built", args)

    with pytest.warns(FutureWarning, match="Built.from_cli moved to Built.from_options"):
        assert Built.from_cli("args") == ("built", "args")
