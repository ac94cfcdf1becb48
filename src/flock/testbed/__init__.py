"""Network-namespace building blocks shared by the integration tests, benchmarks and the lab.

Everything created here carries a caller-chosen name prefix, so that a cleanup
(or `flock lab down` after a crash) can find it again by name alone.
"""
