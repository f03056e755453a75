"""Event brokers: who processes which source, on one process or across many nodes.

``allocation`` is the pure decision of which subscriber of a group holds which source.
"""
