"""Starting or joining Ray the same way from every job (prepare, train, publish, serve)."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None) -> None:
    """Joins the cluster named by ``RAY_ADDRESS`` (what ``ray job submit`` sets), else starts a local Ray.

    A local Ray gets every core of the machine unless told otherwise; ``num_cpus`` lets tests and the demo
    reserve headroom (Ray Data starves behind train workers when the CPUs are all taken).
    """
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )


def quiet_ray_data() -> None:
    """Our own progress bars say what matters; Ray Data's per-operator bars drown them on a console."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
