"""ResRL: residual-weighted negative reinforcement for RL with verifiable rewards.

The library (this package) has no Prefect or MLflow dependency; `tasks/` and
`flows/` wrap it into the orchestrated, tracked workflow. The one exception is
`resrl.cli`, the `resrl` command, which launches those flows (importing them lazily).
"""
__version__ = "0.1.0"
