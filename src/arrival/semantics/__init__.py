"""The guarantees as pure decisions: no I/O, no clock, no global randomness.

Time is passed in as ``now`` (seconds), randomness as a ``random.Random``.
"""
