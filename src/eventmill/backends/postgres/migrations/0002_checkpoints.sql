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
