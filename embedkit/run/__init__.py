"""How a job runs, whatever its stage: OUT preparation and refusals, and the executors (a Ray of
this machine for --gpus N, a cluster for --ray) that run a stage's shard function with
re-issue, the commit arbiter and lock checks. Imports base, engine and io; never a stage: the
stages hand it their shard functions.
"""
