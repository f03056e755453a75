-- Events, the per-stream rows that serialise writers of one stream, and the publish
-- function. "{schema}" is replaced by the quoted schema name when installed.

CREATE SEQUENCE {schema}.event_sequence_numbers AS bigint CACHE 1;

CREATE TABLE {schema}.events (
    sequence_number bigint PRIMARY KEY,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    name text NOT NULL,
    category text NOT NULL,
    stream text NOT NULL,
    position bigint NOT NULL,
    payload jsonb NOT NULL,
    metadata jsonb NOT NULL,
    occurred_at timestamptz NOT NULL,
    observed_at timestamptz NOT NULL DEFAULT now(),
    stream_hash bigint NOT NULL,
    transaction_id xid8 NOT NULL,
    CONSTRAINT events_stream_position_key UNIQUE (category, stream, position)
);

CREATE INDEX events_category_sequence_number_idx
    ON {schema}.events (category, sequence_number);

CREATE TABLE {schema}.streams (
    category text NOT NULL,
    stream text NOT NULL,
    last_position bigint NOT NULL,
    PRIMARY KEY (category, stream)
);

-- Appends events to one stream; called as a single autocommit statement.
-- p_allowed: the write condition as the allowed latest positions (-1: empty stream),
-- NULL for none. p_events: a JSON array of [name, payload, metadata, occurred_at]
-- (one parameter, so the client encodes a batch with one json.dumps). Returns the
-- first sequence number and position (both contiguous for the batch), the observed
-- time, and the new event ids, in order, joined by commas.
CREATE FUNCTION {schema}.publish(
    p_category text,
    p_stream text,
    p_stream_hash bigint,
    p_allowed bigint[],
    p_events jsonb,
    OUT first_sequence_number bigint,
    OUT first_position bigint,
    OUT observed timestamptz,
    OUT event_ids text
) LANGUAGE plpgsql AS $$
DECLARE
    event_count integer := jsonb_array_length(p_events);
    lock_key integer := '{schema}.event_sequence_numbers'::regclass::oid::integer;
    locked boolean := false;
    writer_xid xid8;
    previous bigint;
BEGIN
    -- (a) the xid must be taken below, so nothing may have been written before.
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'publish must be the first write of its transaction'
            USING ERRCODE = 'EM002';
    END IF;
    -- Mark this transaction as a publisher in flight until it ends: readers take the
    -- oldest xid among the holders of this shared lock as their visibility watermark.
    PERFORM pg_advisory_xact_lock_shared(1162690869, lock_key);
    -- (b) xid and sequence numbers in one short critical section: xid order equals
    -- sequence-number order for every publisher. The session lock is released here,
    -- long before commit; the handler releases it if anything fails in between.
    BEGIN
        PERFORM pg_advisory_lock(1162690868, lock_key);
        locked := true;
        writer_xid := pg_current_xact_id();
        first_sequence_number := nextval('{schema}.event_sequence_numbers');
        IF event_count > 1 THEN
            -- Nobody else takes numbers while the lock is held: reserve the block.
            PERFORM setval('{schema}.event_sequence_numbers',
                           first_sequence_number + event_count - 1);
        END IF;
        PERFORM pg_advisory_unlock(1162690868, lock_key);
        locked := false;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        IF locked THEN
            PERFORM pg_advisory_unlock(1162690868, lock_key);
        END IF;
        RAISE;
    END;
    -- (c) lock the stream's row (held to commit: writers of one stream queue here).
    UPDATE {schema}.streams SET last_position = last_position + event_count
        WHERE category = p_category AND stream = p_stream
        RETURNING last_position - event_count INTO previous;
    IF NOT FOUND THEN
        INSERT INTO {schema}.streams (category, stream, last_position)
            VALUES (p_category, p_stream, event_count - 1)
            ON CONFLICT DO NOTHING;
        IF FOUND THEN
            previous := -1;
        ELSE
            UPDATE {schema}.streams SET last_position = last_position + event_count
                WHERE category = p_category AND stream = p_stream
                RETURNING last_position - event_count INTO previous;
        END IF;
    END IF;
    IF p_allowed IS NOT NULL AND NOT previous = ANY (p_allowed) THEN
        RAISE EXCEPTION 'write condition not met' USING ERRCODE = 'EM001', DETAIL = previous;
    END IF;
    -- (d) the rows, stamped with the xid taken in (b).
    first_position := previous + 1;
    observed := now();
    WITH inserted AS (
        INSERT INTO {schema}.events (
            sequence_number, name, category, stream, position, payload, metadata,
            occurred_at, observed_at, stream_hash, transaction_id
        )
        SELECT first_sequence_number + e.ordinal - 1, e.event ->> 0, p_category, p_stream,
               previous + e.ordinal, e.event -> 1, e.event -> 2,
               (e.event ->> 3)::timestamptz, observed, p_stream_hash, writer_xid
        FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e(event, ordinal)
        RETURNING sequence_number, id
    )
    SELECT string_agg(inserted.id::text, ',' ORDER BY inserted.sequence_number)
        INTO event_ids FROM inserted;
END
$$;

-- The visibility watermark for reads: every event whose transaction id is below it
-- has committed or rolled back for good. It is the oldest transaction id among the
-- publishers in flight (holders of the shared advisory lock that publish takes before
-- its xid), or, when there is none, the snapshot's xmax (every later publisher's xid
-- is at least that). Readers must take it in a statement BEFORE the one that reads, so
-- the read's snapshot sees every publisher that ended before the watermark was taken.
-- pg_locks reports 32-bit xids; they are widened with the epoch of the snapshot's
-- xmax (a running xid may be above xmax, but never by 2^31 or more).
CREATE FUNCTION {schema}.publication_watermark() RETURNS xid8 LANGUAGE sql VOLATILE AS $$
    WITH horizon AS (
        SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next
    ), publishers AS (
        SELECT (horizon.next & ~4294967295::bigint) | own.transactionid::text::bigint AS xid
        FROM pg_locks AS marker
        JOIN pg_locks AS own ON own.pid = marker.pid AND own.locktype = 'transactionid'
            AND own.mode = 'ExclusiveLock' AND own.granted
        CROSS JOIN horizon
        WHERE marker.locktype = 'advisory' AND marker.granted
            AND marker.classid = 1162690869
            AND marker.objid = '{schema}.event_sequence_numbers'::regclass::oid
            AND marker.objsubid = 2
            AND marker.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    )
    SELECT least(
        horizon.next,
        (SELECT min(CASE WHEN xid > horizon.next + 2147483648 THEN xid - 4294967296 ELSE xid END)
         FROM publishers)
    )::text::xid8
    FROM horizon
$$;
