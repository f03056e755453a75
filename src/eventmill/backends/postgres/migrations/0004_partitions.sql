-- eventmill: no transaction
-- Partition reads. A stream's bucket is stream_hash % 64 (PARTITION_BUCKETS in
-- eventmill.events; the queries in event_storage.py repeat this exact expression so the
-- planner matches it). A partition of N (a power of two up to 64) is a set of whole
-- buckets, read as a merge of ordered scans of this index, one per bucket.
-- stream_hash has been written by every publish since 0001, so building the index
-- covers existing events; no backfill is needed. Built concurrently on an existing
-- store (publishes and reads go on meanwhile; see schema.py).

CREATE INDEX CONCURRENTLY IF NOT EXISTS events_category_bucket_sequence_number_idx
    ON {schema}.events (category, (stream_hash % 64), sequence_number);
