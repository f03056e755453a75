-- Exact reads in every deployment: whatever the default isolation level, with prepared
-- (2PC) publishers, and on tables copied from another cluster. "{schema}" is the quoted
-- schema name.
--
-- publish now also marks its transaction id: from inside the critical section until it
-- ends, a publisher holds a shared transaction-level advisory lock whose key carries
-- the low 32 bits of its xid (classid: the sequence's oid, objid: the xid, objsubid 1).
-- Readers find publishers by that key alone, not by which session holds the lock, so a
-- prepared transaction (whose locks belong to no session, and move while it prepares)
-- is found like any other.
CREATE OR REPLACE FUNCTION {schema}.publish(
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
    -- The marker of version 0001 (readers of older versions look for it).
    PERFORM pg_advisory_xact_lock_shared(1162690869, lock_key);
    -- (b) xid and sequence numbers in one short critical section: xid order equals
    -- sequence-number order for every publisher. The session lock is released here,
    -- long before commit; the handler releases it if anything fails in between. The
    -- xid's marker is taken before the critical section ends, so from the moment it
    -- has an xid a publisher holds the critical section or its marker.
    BEGIN
        PERFORM pg_advisory_lock(1162690868, lock_key);
        locked := true;
        writer_xid := pg_current_xact_id();
        PERFORM pg_advisory_xact_lock_shared(
            ('{schema}.event_sequence_numbers'::regclass::oid::bigint << 32)
            | (writer_xid::text::bigint & 4294967295));
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

-- The visibility watermark for reads, replacing publication_watermark() (kept for
-- processes of older versions): every event whose transaction id is below it has
-- committed or rolled back for good. Readers take it in one statement and read in the
-- NEXT statement, under READ COMMITTED, so the read's snapshot is newer than this
-- statement's lock-table scan and sees every publisher that had ended by then.
--
-- It is the oldest xid among the publishers in flight, or, when there is none, this
-- statement's snapshot's xmax (an xid assigned after the scan is at least that).
-- Publishers are found by one read of the lock table (one pg_locks scan is
-- self-consistent): the xid markers that publish holds from inside its critical
-- section until it ends, and the xid of the session inside the critical section (it
-- has taken its xid but perhaps not yet its marker). So a publisher in progress at the
-- scan, prepared (2PC) ones included, is always found; one that is not found had ended
-- before the scan, so the next statement's snapshot sees it. pg_locks reports 32-bit
-- xids; they are widened with the epoch of the snapshot's xmax (a running xid may be
-- above xmax, but never by 2^31 or more).
--
-- Refused, so that no read is silently inexact:
-- * EM003 on a server in recovery, whose lock table does not show the primary's
--   publishers;
-- * EM004 when this transaction is not READ COMMITTED (the next statement would reuse
--   this statement's snapshot): the reader sets its session's default and reads again.
CREATE FUNCTION {schema}.read_watermark() RETURNS xid8 LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    sequence_oid bigint := '{schema}.event_sequence_numbers'::regclass::oid::bigint;
    horizon bigint := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    oldest bigint;
BEGIN
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION 'this server is a standby (in recovery): log and category reads '
            'need the primary' USING ERRCODE = 'EM003';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'reads need READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = 'EM004';
    END IF;
    WITH locks AS MATERIALIZED (
        SELECT locktype, classid, objid, objsubid, pid, transactionid FROM pg_locks
        WHERE granted AND locktype IN ('advisory', 'transactionid')
    ), publishers AS (
        SELECT objid::bigint AS xid32 FROM locks
        WHERE locktype = 'advisory' AND classid::bigint = sequence_oid AND objsubid = 1
        UNION ALL
        SELECT own.transactionid::text::bigint FROM locks AS own
        JOIN locks AS critical ON critical.pid = own.pid
        WHERE own.locktype = 'transactionid' AND critical.locktype = 'advisory'
            AND critical.classid = 1162690868 AND critical.objsubid = 2
            AND critical.objid::bigint = sequence_oid
    ), widened AS (
        SELECT (horizon & ~4294967295::bigint) | xid32 AS xid FROM publishers
    )
    SELECT min(CASE WHEN xid > horizon + 2147483648 THEN xid - 4294967296 ELSE xid END)
        INTO oldest FROM widened;
    RETURN least(horizon, oldest)::text::xid8;
END
$$;
