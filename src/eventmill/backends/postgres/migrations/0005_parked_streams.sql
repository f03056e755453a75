-- Poison events: streams a group holds back in one source after its processor failed
-- (one row per group, source and stream; the held events stay in the events table),
-- and the record of events a group skipped. "{schema}" is the quoted schema name.

CREATE TABLE {schema}.parked_streams (
    group_name text NOT NULL,
    source_key text NOT NULL,
    source jsonb NOT NULL,
    category text NOT NULL,
    stream text NOT NULL,
    sequence_number bigint NOT NULL,
    position bigint NOT NULL,
    event_name text NOT NULL,
    held bigint NOT NULL,
    last_held bigint NOT NULL,
    error_type text NOT NULL,
    error_message text NOT NULL,
    traceback text NOT NULL,
    attempts integer NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at timestamptz NOT NULL,
    request text,
    skip_through bigint,
    PRIMARY KEY (group_name, source_key, category, stream)
);

CREATE TABLE {schema}.skipped_events (
    id bigserial PRIMARY KEY,
    group_name text NOT NULL,
    source jsonb NOT NULL,
    category text NOT NULL,
    stream text NOT NULL,
    sequence_number bigint NOT NULL,
    position bigint NOT NULL,
    event_name text NOT NULL,
    reason text NOT NULL,
    error_type text NOT NULL,
    error_message text NOT NULL,
    skipped_at timestamptz NOT NULL
);

CREATE INDEX skipped_events_group_idx ON {schema}.skipped_events (group_name, skipped_at);
