"""Planning: the fleet model (GPUs, hours and dollars inside a window), token-count sampling, the
shard-size policy, and plots of a plan and of a finished run. Imports base, engine, io and run;
never a stage (the dry runs that call stages live in `embedkit.dryrun`, above them).
"""
