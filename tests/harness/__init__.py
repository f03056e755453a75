"""Multi-process test harness: node processes, fault injection (not part of the wheel)."""
