"""What keeps a run going, or ends it with a clear reason, when something goes wrong at scale.

progress.py   where each process is (phase, step, micro-batch), recorded cheaply by the loop
board.py      the job's notice board over its store: every process's heartbeat, the first failure
watchdog.py   ends a process that stops making progress, with a report; stop signals that cannot be trapped
report.py     the stall report: what stopped, where every process is, stacks, DataLoader workers
"""
