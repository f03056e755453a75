"""Benchmarks: each module's ``main()`` prints one JSON object per figure."""
