-- History fetched from the target's /backfill for /messages: the events missing at a gap of a
-- room's stream, kept apart from the stream (they cannot get stream positions between existing
-- ones). peekproxy/peeks/reading.py explains how pages and tokens walk through them.

-- One row per gap that has been (partly) filled. gap_pos is the gap row's stream_pos, or 0 for
-- what precedes the room's first stream row when that row is an event.
CREATE TABLE gap_fills (
    room_id TEXT NOT NULL,
    gap_pos INTEGER NOT NULL,
    closed  INTEGER NOT NULL DEFAULT 0,  -- 1: backfill reached history held before the gap
    PRIMARY KEY (room_id, gap_pos)
);

-- The fetched events of each gap in DAG order: seq 1 is the newest (just before the event
-- after the gap), larger seq is older; each backfill round continues from the largest seq.
CREATE TABLE gap_events (
    room_id  TEXT NOT NULL,
    gap_pos  INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, gap_pos, seq)
);
CREATE UNIQUE INDEX gap_events_event ON gap_events (event_id);
