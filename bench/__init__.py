"""The benchmark of issue 5: throughput, contention, round trips, soak and audit at scale.

Run from the repository root; see ``bench/README.md``. Not part of the installed package.
"""
