-- Broker state: who is alive (subscribers) and who holds which source (subscriptions).
-- "{schema}" is the quoted schema name. Times come from the database clock, so nodes
-- with skewed clocks agree on ages.

CREATE TABLE {schema}.subscribers (
    group_name text NOT NULL,
    subscriber_id text NOT NULL,
    node_id text NOT NULL,
    subscription_requests jsonb NOT NULL,
    registered_at timestamptz NOT NULL,
    last_seen timestamptz NOT NULL,
    PRIMARY KEY (group_name, subscriber_id)
);

CREATE INDEX subscribers_last_seen_idx ON {schema}.subscribers (last_seen);

-- One row per (group, source); released rows keep their epoch, which only grows.
CREATE TABLE {schema}.subscriptions (
    group_name text NOT NULL,
    source_key text NOT NULL,
    source jsonb NOT NULL,
    subscriber_id text,
    node_id text,
    epoch bigint NOT NULL CHECK (epoch >= 1),
    state text NOT NULL CHECK (state IN ('assigned', 'revoking', 'released')),
    PRIMARY KEY (group_name, source_key),
    CHECK ((state = 'released') = (subscriber_id IS NULL)),
    CHECK ((subscriber_id IS NULL) = (node_id IS NULL))
);

CREATE INDEX subscriptions_node_idx ON {schema}.subscriptions (node_id)
    WHERE node_id IS NOT NULL;
