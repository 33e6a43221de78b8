"""Building the pluggy plugin manager: installed plugins (entry points of group ``microtrain``,
the built-ins included), then modules a recipe names, then callbacks the recipe enables."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import pluggy

from microtrain import hookspecs
from microtrain.components import Registry
from microtrain.errors import MicrotrainError, PluginError, PluginHookError

ENTRY_POINT_GROUP = "microtrain"


def create_plugin_manager(modules: Iterable[str] = ()) -> tuple[pluggy.PluginManager, Registry]:
    """Load entry-point plugins and the given module paths; collect their components."""
    pm = pluggy.PluginManager("microtrain")
    pm.add_hookspecs(hookspecs)
    _load_entry_points(pm)
    for module in modules:
        register_module(pm, module)
    registry = Registry()
    for impl in reversed(pm.hook.register_components.get_hookimpls()):
        registry.current_plugin = impl.plugin_name
        try:
            impl.function(registry=registry)
        except MicrotrainError:
            raise
        except Exception as exc:
            raise PluginHookError(impl.plugin_name, "register_components", exc) from exc
    registry.current_plugin = "?"
    return pm, registry


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            dist = ep.dist.name if ep.dist else "?"
            raise PluginError(
                f"installed plugin '{ep.name}' ({ep.value}, from package {dist}) failed to import: "
                f"{type(exc).__name__}: {exc}; fix or uninstall that package"
            ) from None
        _register(pm, plugin, ep.name)


def register_module(pm: pluggy.PluginManager, module_path: str) -> None:
    """Import ``module_path`` and register it as a plugin named after it."""
    if pm.get_plugin(module_path) is not None:
        return
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        raise PluginError(
            f"plugin module '{module_path}' not found ({exc}); check the name in the recipe's plugins list "
            "and that the module is on PYTHONPATH or installed"
        ) from None
    except Exception as exc:
        raise PluginError(f"plugin module '{module_path}' failed to import: {type(exc).__name__}: {exc}") from None
    for registered in pm.get_plugins():
        if registered is module:
            return
    _register(pm, module, module_path)


def register_callback(pm: pluggy.PluginManager, instance: Any, name: str) -> None:
    """Callbacks are registered as ``callback:<name>`` beside the module that provides them."""
    _register(pm, instance, f"callback:{name}")


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        raise PluginError(f"plugin '{name}' is invalid: {exc}; see `microtrain plugins` for the hooks and their arguments") from None
    except ValueError:
        raise PluginError(f"plugin '{name}' is listed twice; remove the duplicate from the recipe's plugins") from None


def call_hook(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> Any:
    """Call ``hook``; if an implementation raises, re-raise naming its plugin and the hook."""
    caller = getattr(pm.hook, hook)
    try:
        return caller(**kwargs)
    except (MicrotrainError, KeyboardInterrupt):
        raise
    except Exception as exc:
        plugin = _plugin_of_traceback(pm, caller, exc)
        raise PluginHookError(plugin, hook, exc) from exc


def _plugin_of_traceback(pm: pluggy.PluginManager, caller: Any, exc: BaseException) -> str:
    """Find which hook implementation's function appears in the exception's traceback."""
    impls = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls() if hasattr(impl.function, "__code__")}
    tb = exc.__traceback__
    found = "?"
    while tb is not None:
        code = tb.tb_frame.f_code
        if code in impls:
            found = impls[code]
        tb = tb.tb_next
    return found
