-- The sync front (docs/front.md): clients hold only the homeserver's own next_batch tokens;
-- peekproxy keeps, per device, which peek stream position each of them stands for. Tokens
-- are stored as their sha256 (hex), never in clear. The newest rows of a device are kept
-- (store/sqlite/front.py trims the rest); a larger rowid is a newer row (INSERT OR REPLACE
-- gives a re-saved token a new rowid).
CREATE TABLE front_positions (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    token_hash TEXT NOT NULL,               -- sha256 hex of the homeserver's next_batch
    stream_pos INTEGER NOT NULL,            -- the peek stream position it stands for
    saved_ts   INTEGER NOT NULL,            -- ms
    UNIQUE (user_id, device_id, token_hash)
);
CREATE INDEX front_positions_device ON front_positions (user_id, device_id);

-- device_peeks.state may now also be 'joined': the user joined the room on the homeserver
-- while peeking it; such a peek is never shown again (neither in rooms.peek nor rooms.leave).
