-- Consumers: checkpoints per (group, source), projection states, and the NOTIFY that
-- wakes readers when events are published. "{schema}" is the quoted schema name.

CREATE TABLE {schema}.checkpoints (
    group_name text NOT NULL,
    source_key text NOT NULL,
    source jsonb NOT NULL,
    after_place bigint,
    version bigint NOT NULL,
    epoch bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, source_key)
);

CREATE TABLE {schema}.projections (
    name text NOT NULL,
    id text NOT NULL,
    state jsonb NOT NULL,
    version bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, id)
);

CREATE INDEX projections_state_idx ON {schema}.projections USING gin (state jsonb_path_ops);

-- One notification per published category, on the channel "<schema>_events" (the
-- schema name cut to 56 characters: a shared channel only costs spurious wake-ups).
-- NOTIFY is sent at commit and folds duplicates within a transaction.
CREATE FUNCTION {schema}.notify_published() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(left(TG_TABLE_SCHEMA, 56) || '_events', published.category)
    FROM (SELECT DISTINCT category FROM published_events) AS published;
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify_published
    AFTER INSERT ON {schema}.events
    REFERENCING NEW TABLE AS published_events
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_published();
