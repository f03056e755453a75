"""Helpers for testing code built on eventmill: event builders and random data."""

from eventmill.testing.builders import NewEventBuilder, StoredEventBuilder, random_events

__all__ = ["NewEventBuilder", "StoredEventBuilder", "random_events"]
