-- Versioned projections (blue/green rebuilds): one row per projection version. Each
-- version's tables live in a schema of its own; the read alias is a schema of views
-- that cut_over points at the serving version (projection_versions.py).

CREATE TABLE {schema}.projection_versions (
    name text NOT NULL,
    version integer NOT NULL CHECK (version >= 1),
    state text NOT NULL CHECK (state IN ('building', 'serving', 'retiring', 'retired')),
    declared_at timestamptz NOT NULL DEFAULT now(),
    changed_at timestamptz NOT NULL DEFAULT now(),
    retire_after timestamptz,
    behind bigint,
    eta_seconds double precision,
    PRIMARY KEY (name, version)
);
