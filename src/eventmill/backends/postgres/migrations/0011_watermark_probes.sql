-- The visibility watermark without reading the lock table: its cost no longer grows
-- with the locks other sessions hold (each pg_locks read takes every lock-manager
-- partition lock and copies every lock, which slowed both the readers and everything
-- else on the server). "{schema}" is the quoted schema name.
--
-- What it returns is unchanged (migration 0008): the oldest xid among the publishers in
-- flight, or, when there is none, the snapshot's xmax; readers take it in one statement
-- and read in the NEXT one, under READ COMMITTED. How publishers are found changes:
--
-- 1. Snapshot S is taken at t0. An xid below S's xmax and not in S's xip list had ended
--    by t0; an xid at or above xmax is covered by returning at most xmax. So only the
--    xids in xip (running at t0) need a look; when there are none (xmin = xmax), xmax
--    is the answer and no lock is touched.
-- 2. The xids of xip are probed, lowest first: a publisher's marker (a shared
--    transaction-level advisory lock, key: sequence oid << 32 | low 32 bits of its
--    xid, taken inside the critical section where it takes its xid, held until it
--    ends) is held when an exclusive try-lock of its key fails. A probe that succeeds
--    is released at once. The first xid whose probe fails is returned (a failure can
--    also be another reader probing the same key at that instant: the result is then
--    lower than it could be, and any lower bound is still exact).
--
-- Why that is exact. Let W be the result, R a row the next statement returns (visible
-- to its snapshot, below W, every earlier row of the read likewise) and Q a publisher
-- with a lower sequence number than R's. Then Q's xid is lower than R's (xid order is
-- sequence-number order), so below W <= xmax: Q had its xid at t0. If Q had ended by
-- t0, the read sees it. Otherwise Q was in xip and, being below W, was probed and its
-- marker was free: Q had ended by then (the read sees it), or Q was still inside the
-- critical section, having taken its xid but not yet its marker. In that last case R's
-- publisher took its xid after Q left the critical section, after t0, so R's xid is at
-- least xmax >= W: R is not returned. So no returned row has an earlier publisher the
-- read does not see. A transaction in xip that never publishes (a checkpoint
-- transaction, any other work) costs one probe and holds nothing back.
--
-- A prepared (2PC) publisher is in xip (prepared transactions run until COMMIT or
-- ROLLBACK PREPARED) and its marker stays held through PREPARE (its locks are handed to
-- the prepared transaction, never released), so it is found like any other. A probe's
-- session-level lock is released by the exception handler if the statement fails
-- while holding it: a cancelled read never leaves a marker's key locked (a publisher
-- inside the critical section would wait for it, and every other publisher behind).
--
-- Refused as before: EM003 on a server in recovery (a standby's snapshots and locks
-- do not show the primary's publishers), EM004 when this transaction is not READ
-- COMMITTED (the next statement would reuse this snapshot).
CREATE OR REPLACE FUNCTION {schema}.read_watermark() RETURNS xid8 LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    snapshot pg_snapshot := pg_current_snapshot();
    sequence_oid bigint := '{schema}.event_sequence_numbers'::regclass::oid::bigint;
    running xid8;
    probed bigint;
    held boolean := false;
BEGIN
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION 'this server is a standby (in recovery): log and category reads '
            'need the primary' USING ERRCODE = 'EM003';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'reads need READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = 'EM004';
    END IF;
    IF pg_snapshot_xmin(snapshot) = pg_snapshot_xmax(snapshot) THEN
        RETURN pg_snapshot_xmax(snapshot);
    END IF;
    BEGIN
        FOR running IN SELECT xid FROM pg_snapshot_xip(snapshot) AS xid ORDER BY xid LOOP
            probed := (sequence_oid << 32) | (running::text::bigint & 4294967295);
            held := pg_try_advisory_lock(probed);
            IF NOT held THEN
                RETURN running;
            END IF;
            PERFORM pg_advisory_unlock(probed);
            held := false;
        END LOOP;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        IF held THEN
            PERFORM pg_advisory_unlock(probed);
        END IF;
        RAISE;
    END;
    RETURN pg_snapshot_xmax(snapshot);
END
$$;
