-- History fetched for the gaps of a room's stream (as store/sqlite/migrations/0005).
CREATE TABLE gap_fills (
    room_id TEXT NOT NULL,
    gap_pos BIGINT NOT NULL,
    closed  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, gap_pos)
);

CREATE TABLE gap_events (
    room_id  TEXT NOT NULL,
    gap_pos  BIGINT NOT NULL,
    seq      BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, gap_pos, seq)
);
CREATE UNIQUE INDEX gap_events_event ON gap_events (event_id);
