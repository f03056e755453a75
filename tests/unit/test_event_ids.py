"""Event ids and stored events as storage makes them: version-4 UUIDs, unique, none
shared with a forked child; ``stored_event`` equal to the dataclass's constructor."""

from __future__ import annotations

import dataclasses
import os
import pickle
import uuid
from datetime import UTC, datetime

import pytest

from eventmill.events import StoredEvent, new_event_id, new_event_ids, stored_event


def test_ids_are_distinct_version_4_uuids_one_at_a_time_or_many() -> None:
    ids = [new_event_id() for _ in range(300)] + new_event_ids(300)
    ids += [made for count in (1, 2, 3, 37) for made in new_event_ids(count)]
    assert len(set(ids)) == len(ids) == 643
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_makes_ids_its_parent_never_does() -> None:
    new_event_id()  # the parent now holds ids made ahead
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writing, "\n".join(new_event_id() for _ in range(64)).encode())
        os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        theirs = set(pipe.read().split("\n"))
    os.waitpid(child, 0)
    ours = {new_event_id() for _ in range(64)}
    assert len(theirs) == 64 and not theirs & ours


def test_stored_event_is_the_dataclass_event_and_stays_frozen() -> None:
    now = datetime.now(UTC)
    made = stored_event("id", "name", "category", "stream", 3, 9, {"a": 1}, {}, now, now)
    assert made == StoredEvent(
        id="id",
        name="name",
        category="category",
        stream="stream",
        position=3,
        sequence_number=9,
        payload={"a": 1},
        metadata={},
        occurred_at=now,
        observed_at=now,
    )
    assert dataclasses.astuple(made) == (
        "id",
        "name",
        "category",
        "stream",
        3,
        9,
        {"a": 1},
        {},
        now,
        now,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.name = "other"  # type: ignore[misc]
    assert type(made) is StoredEvent
    assert pickle.loads(pickle.dumps(made)) == made
    assert dataclasses.replace(made, position=4).position == 4


def test_every_bit_but_version_and_variant_varies() -> None:
    ids = [uuid.UUID(text).int for text in new_event_ids(1_000)]
    # version 4 in bits 76-79 (0100), variant RFC 4122 in bits 62-63 (10)
    fixed = {79: 0, 78: 1, 77: 0, 76: 0, 63: 1, 62: 0}
    for bit in range(128):
        seen = {(value >> bit) & 1 for value in ids}
        assert seen == ({fixed[bit]} if bit in fixed else {0, 1}), bit
