-- Typing and receipts per user (as store/sqlite/migrations/0006). No PostgreSQL database was
-- ever written with the old one-row-per-type table, so it is replaced without copying rows.
DROP TABLE ephemeral;
CREATE TABLE ephemeral (
    room_id      TEXT NOT NULL,
    edu_type     TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    receipt_type TEXT NOT NULL DEFAULT '',
    content_json TEXT NOT NULL,
    typing       INTEGER NOT NULL DEFAULT 0,
    stream_pos   BIGINT NOT NULL,
    PRIMARY KEY (room_id, edu_type, user_id, receipt_type)
);
CREATE INDEX ephemeral_pos ON ephemeral (stream_pos);
CREATE INDEX ephemeral_room ON ephemeral (room_id, stream_pos);
CREATE INDEX ephemeral_typing ON ephemeral (typing) WHERE typing = 1;
