-- Live resets (GroupStorage.reset): a reset checkpoint is marked until its next save,
-- in whose transaction a transactional processor's on_reset hook runs.

ALTER TABLE {schema}.checkpoints ADD COLUMN reset_pending boolean NOT NULL DEFAULT false;
