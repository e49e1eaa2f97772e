"""Worked plug-ins for pagedlab: parts that live outside the package and plug in by ``_target_``.

* :mod:`pagedlab_plugins.victims`: victim policies ``MostRemaining`` (SRPT-flavoured) and
  ``FewestPreemptions`` (fairness);
* :mod:`pagedlab_plugins.allocators`: ``conservative_paged`` (admit a group only when its whole final
  length fits next to what the running sequences will still take: never preempts) and ``worst_fit``
  (a placement rule for the contiguous allocator);
* :mod:`pagedlab_plugins.kernels`: ``ReferenceKernel``, attention in float32 with explicit matmul and
  softmax, one sequence at a time (for debugging numerics).

Their YAML files are in ``../conf/<group>/``. Put this folder on the path and add that config dir::

    PYTHONPATH=experiments/plugins python -m pagedlab.run -cd experiments/plugins/conf \\
        allocator=conservative_paged eviction=recompute_most_remaining executor=sim

See docs/extending.md.
"""
