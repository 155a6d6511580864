-- The sync front's positions (as store/sqlite/migrations/0007). SQLite orders a device's rows
-- by its implicit rowid; here a "rowid" identity column plays that part (store/sql/front.py).
CREATE TABLE front_positions (
    rowid      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    stream_pos BIGINT NOT NULL,
    saved_ts   BIGINT NOT NULL,
    UNIQUE (user_id, device_id, token_hash)
);
CREATE INDEX front_positions_device ON front_positions (user_id, device_id);
