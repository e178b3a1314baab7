"""`soma bench`: what a call through Soma costs, measured beside bare baselines in one run.

Every case is measured in interleaved batches with the baseline it is compared to (case and
baseline alternate, batch by batch), so a noisy moment on a shared machine moves both; the
figures are medians of per-batch figures, with the spread of the batch medians beside them.
"""

# The groups of cases `soma bench --cases` chooses from (soma_bench.cli describes each).
GROUPS = ("echo", "inflight", "payload", "supervised", "gateway", "runtimes", "bridge")
