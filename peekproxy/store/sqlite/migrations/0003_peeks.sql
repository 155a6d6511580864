-- Remote peek subscriptions (one per room), the events they deliver, and device peeks.

-- One MSC2444 subscription per remote room; see peekproxy/peeks/subscription.py for states.
CREATE TABLE subscriptions (
    room_id            TEXT PRIMARY KEY NOT NULL,
    room_version       TEXT,
    state              TEXT NOT NULL,
    candidates_json    TEXT NOT NULL,       -- servers to peek through, in order
    server             TEXT,                -- the server currently peeked
    peek_id            TEXT,
    remote_interval_ms INTEGER,             -- renewal_interval the server gave
    last_renewed_ts    INTEGER,             -- ms; when the server last confirmed the peek
    renew_at_ts        INTEGER,             -- ms
    wanted             INTEGER NOT NULL,    -- 1 while a device peek is active
    linger_until_ts    INTEGER,             -- ms; stop after this when not wanted
    ended_reason       TEXT,
    pending_deletes_json TEXT NOT NULL DEFAULT '[]'  -- [[server, peek_id], ...] still to DELETE
);

-- Every PDU we hold, as stored (redacted when its content hash did not match).
CREATE TABLE events (
    event_id  TEXT PRIMARY KEY NOT NULL,
    room_id   TEXT NOT NULL,
    pdu_json  TEXT NOT NULL,
    redacted  INTEGER NOT NULL DEFAULT 0
);

-- Each room's ordered stream: events in arrival order, and gap markers. stream_pos is global,
-- so one position orders everything (sync tokens are built on it).
CREATE TABLE room_stream (
    stream_pos INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,               -- 'event', 'gap' (history missing before the next event)
    event_id   TEXT,
    received_ts INTEGER NOT NULL
);
CREATE INDEX room_stream_room ON room_stream (room_id, stream_pos);
CREATE UNIQUE INDEX room_stream_event ON room_stream (event_id) WHERE event_id IS NOT NULL
    AND kind = 'event';

-- Current state of each room: (type, state_key) -> event.
CREATE TABLE room_state (
    room_id   TEXT NOT NULL,
    type      TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    PRIMARY KEY (room_id, type, state_key)
);

-- Received transactions, for idempotency per (origin, txn_id): a replay gets this response.
CREATE TABLE federation_txns (
    origin        TEXT NOT NULL,
    txn_id        TEXT NOT NULL,
    response_json TEXT NOT NULL,
    received_ts   INTEGER NOT NULL,
    PRIMARY KEY (origin, txn_id)
);

-- Latest m.typing / m.receipt EDU content per room, for the sync ephemeral section.
CREATE TABLE ephemeral (
    room_id      TEXT NOT NULL,
    edu_type     TEXT NOT NULL,
    content_json TEXT NOT NULL,
    stream_pos   INTEGER NOT NULL,
    PRIMARY KEY (room_id, edu_type)
);

-- Which device peeks which room.
CREATE TABLE device_peeks (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    room_id    TEXT NOT NULL,
    state      TEXT NOT NULL,               -- 'active', 'dormant', 'ended'
    created_ts INTEGER NOT NULL,
    changed_pos INTEGER NOT NULL,           -- room_stream position when it last changed
    PRIMARY KEY (user_id, device_id, room_id)
);
CREATE INDEX device_peeks_room ON device_peeks (room_id, state);
