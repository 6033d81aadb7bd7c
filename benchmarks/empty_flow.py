"""A flow that does nothing: what a run of the local stack's process worker costs by itself
(benchmarks/run_overhead.py deploys it beside db-migrate, with the same pull step)."""

from prefect import flow


@flow(name="benchmark-empty")
def empty() -> None:
    """Nothing: the floor of a deployment run on a process worker."""
