-- Heartbeats become HOT updates: no index covers last_seen any more (liveness is
-- judged by reading the whole, small, table), and nine tenths of each page stay free for the
-- new row versions. "{schema}" is the quoted schema name.

DROP INDEX IF EXISTS {schema}.subscribers_last_seen_idx;
ALTER TABLE {schema}.subscribers SET (fillfactor = 10);
ALTER TABLE {schema}.nodes SET (fillfactor = 10);
