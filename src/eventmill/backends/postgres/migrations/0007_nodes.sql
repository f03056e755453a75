-- Nodes: one row per node (any mode), refreshed by its heartbeat; read by
-- `eventmill status`. "{schema}" is the quoted schema name; times are the database's.

CREATE TABLE {schema}.nodes (
    node_id text PRIMARY KEY,
    mode text NOT NULL,
    started_at timestamptz NOT NULL,
    last_seen timestamptz NOT NULL,
    leader_term bigint,
    leader_since timestamptz,
    CHECK ((leader_term IS NULL) = (leader_since IS NULL))
);
