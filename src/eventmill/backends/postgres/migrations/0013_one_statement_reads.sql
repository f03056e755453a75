-- Log and category reads in one statement: the watermark and the page in one function
-- call instead of two statements pipelined. A tail read (the one that delivers a
-- publish to a woken subscriber) cost the client about 60 us more CPU and the round
-- trip about 70 us more as two statements in a pipeline. "{schema}" is the quoted
-- schema name.
--
-- Exactness is the argument of migration 0011 unchanged: the watermark is taken by
-- read_watermark() with its own snapshot, and the page is read by the NEXT SQL
-- statement. Here that statement is the RETURN QUERY below: these functions are
-- VOLATILE, and under READ COMMITTED each statement a volatile PL/pgSQL function runs
-- takes a new snapshot, after everything evaluated before it (the watermark's probes
-- included), just as the second statement of a pipeline did. read_watermark() still
-- refuses any other isolation level (EM004) and a server in recovery (EM003).
--
-- The page is planned with bitmap and sequential scans off (the function's SET
-- clauses, as the pipelined statement set them): an ordered index scan that stops
-- after p_limit rows, whatever the planner estimates of the rows after p_after. It
-- stops at the first row at or above the watermark rather than filtering it out (see
-- event_storage.py). Partition reads keep the two statements: their query has one
-- index scan per bucket of the partition, a shape that varies with the partition count.
CREATE FUNCTION {schema}.read_log(p_after bigint, p_limit integer)
RETURNS TABLE (
    id text, name text, category text, stream text, "position" bigint,
    sequence_number bigint, payload text, metadata text, occurred_at text, observed_at text
) LANGUAGE plpgsql VOLATILE SET enable_bitmapscan = off SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    watermark xid8 := {schema}.read_watermark();
BEGIN
    RETURN QUERY
    SELECT page.id::text, page.name, page.category, page.stream, page.position,
           page.sequence_number, page.payload::text, page.metadata::text,
           (page.occurred_at AT TIME ZONE 'UTC')::text || 'Z',
           (page.observed_at AT TIME ZONE 'UTC')::text || 'Z'
    FROM (
        SELECT e.*, bool_and(e.transaction_id < watermark)
            OVER (ORDER BY e.sequence_number) AS below
        FROM (
            SELECT * FROM {schema}.events AS x WHERE x.sequence_number > p_after
            ORDER BY x.sequence_number LIMIT p_limit
        ) AS e
    ) AS page
    WHERE page.below ORDER BY page.sequence_number;
END
$$;

CREATE FUNCTION {schema}.read_category(p_category text, p_after bigint, p_limit integer)
RETURNS TABLE (
    id text, name text, category text, stream text, "position" bigint,
    sequence_number bigint, payload text, metadata text, occurred_at text, observed_at text
) LANGUAGE plpgsql VOLATILE SET enable_bitmapscan = off SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    watermark xid8 := {schema}.read_watermark();
BEGIN
    RETURN QUERY
    SELECT page.id::text, page.name, page.category, page.stream, page.position,
           page.sequence_number, page.payload::text, page.metadata::text,
           (page.occurred_at AT TIME ZONE 'UTC')::text || 'Z',
           (page.observed_at AT TIME ZONE 'UTC')::text || 'Z'
    FROM (
        SELECT e.*, bool_and(e.transaction_id < watermark)
            OVER (ORDER BY e.sequence_number) AS below
        FROM (
            SELECT * FROM {schema}.events AS x
            WHERE x.category = p_category AND x.sequence_number > p_after
            ORDER BY x.sequence_number LIMIT p_limit
        ) AS e
    ) AS page
    WHERE page.below ORDER BY page.sequence_number;
END
$$;
