"""The interchangeable parts: one ``typing.Protocol`` each, and the one way they are built.

Every part is chosen by the ``_target_`` of its config group (``conf/<group>/*.yaml``), so a class in
the user's own module plugs in with a YAML file in the user's own config dir (docs/extending.md):

=============  ==============================================  ============================================
group          protocol (contract in its docstring)              built-in classes
=============  ==============================================  ============================================
``allocator``  :class:`pagedlab.kv.KVManager`                    ``pagedlab.kv.paged_manager`` (paged, with the
                                                                sharing and prefix-cache layers),
                                                                ``pagedlab.kv.ContiguousBlockManager``
``eviction``   :class:`pagedlab.engine.preemption.Preemption`   its ``victim``: a
                                                                :class:`~pagedlab.engine.preemption.VictimPolicy`
``kernel``     :class:`pagedlab.kernels.AttentionKernel`       ``TorchGatherKernel``, ``TritonKernel``
``executor``   :class:`pagedlab.executors.base.Backend`        ``SimBackend``, ``TorchBackend``
``workload``   :class:`pagedlab.workloads.Workload`            ``SyntheticWorkload``, ``TraceWorkload``
``sampling``   ``sampler``: a :class:`pagedlab.engine.sampler.TokenSampler` (null: the executor's own)
``logger``     :class:`pagedlab.app.loggers.RunLogger`         ``WandbLogger``, ``NullLogger``
=============  ==============================================  ============================================

A group's ``name`` is its label in result tables and W&B; every other key is a constructor argument,
and the engine adds the run-time ones (block counts, the model's shapes). A constructor refuses an
argument it does not allow with :class:`pagedlab.errors.BadArgument`; :func:`instantiate_part` turns
that (and a missing class, or an unknown argument) into a :class:`pagedlab.config.ConfigError` naming
``group.arg``, its value and what is allowed.
"""

from __future__ import annotations

from typing import Any

from pagedlab.errors import BadArgument, show

LABEL = "name"  # a group's label, never passed to its constructor


def part_kwargs(node: Any) -> dict[str, Any]:
    """The config node minus its label (what instantiate passes on)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    data.pop(LABEL, None)
    return data


def target_of(node: Any, group: str) -> str:
    """The dotted path a group names; ConfigError when there is none."""
    from pagedlab.config import ConfigError

    target = node.get("_target_") if hasattr(node, "get") else None
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{group}._target_={show(target)} is not allowed: expected the dotted path of a class "
                          f"or function (a group file sets it, e.g. conf/{group}/*.yaml)")
    return target


def locate(node: Any, group: str) -> Any:
    """The class (or function) a group's ``_target_`` names, imported but not called."""
    from hydra.utils import get_object

    from pagedlab.config import ConfigError

    target = target_of(node, group)
    try:
        return get_object(target)
    except Exception as exc:  # noqa: BLE001 - Hydra wraps the import error; say what could not be found
        cause = exc.__cause__ or exc
        raise ConfigError(f"{group}._target_={target} is not allowed: expected an importable class or function "
                          f"({type(cause).__name__}: {cause}; is its module on PYTHONPATH?)") from None


def instantiate_part(node: Any, group: str, /, *args: Any, **runtime: Any) -> Any:
    """Build the part a config group names: ``_target_(*args, **(node args), **runtime)``.

    Errors name the field: a :class:`BadArgument` from the constructor becomes ``group.arg=value is not
    allowed: expected ...``; an unknown or missing argument, or any other ValueError/TypeError, becomes
    ``group (_target_): message``."""
    from hydra.utils import instantiate

    from pagedlab.config import ConfigError

    cls = locate(node, group)
    try:  # the node's own arguments through Hydra (nested ``_target_`` nodes built too); run-time ones as given
        factory = instantiate(part_kwargs(node), _partial_=True, _convert_="all")
        return factory(*args, **runtime)
    except Exception as exc:
        cause = exc.__cause__ if type(exc).__name__ == "InstantiationException" and exc.__cause__ else exc
        if isinstance(cause, BadArgument):
            msg = f"{cause} (with {group}={node.get(LABEL) or target_of(node, group)})" if cause.arg in runtime \
                else f"{group}.{cause}"
            raise ConfigError(msg, [msg]) from None
        if isinstance(cause, (TypeError, ValueError)):
            msg = f"{group} ({getattr(cls, '__qualname__', cls)}): {cause}"
            raise ConfigError(msg, [msg]) from None
        if type(exc).__name__ == "InstantiationException":  # e.g. a nested _target_ that cannot be imported
            msg = f"{group}: " + " ".join(str(exc).replace(", set env var HYDRA_FULL_ERROR=1 to see chained "
                                                           "exception.", ";").split())
            raise ConfigError(msg, [msg]) from None
        raise
