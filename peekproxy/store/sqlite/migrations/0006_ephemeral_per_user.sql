-- Typing and receipts per user (issue 10 item 8): the old table kept ONE row per (room, EDU
-- type), so of two users typing (or sending receipts) within one sync range only the last
-- showed. Now one row per (room, m.typing, user) and per (room, m.receipt, user, receipt
-- type); each row is the newest EDU of its key and has its own room_stream position.
--
-- content_json: m.typing {"room_id", "user_id", "typing": bool};
--               m.receipt {receipt_type: {user_id: {"event_ids": [...], "data": {...}}}}.
-- typing: 1 for an m.typing row saying the user is typing (the rows every sync of the room
-- needs, to list who is typing now).
CREATE TABLE ephemeral_per_user (
    room_id      TEXT NOT NULL,
    edu_type     TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    receipt_type TEXT NOT NULL DEFAULT '',
    content_json TEXT NOT NULL,
    typing       INTEGER NOT NULL DEFAULT 0,
    stream_pos   INTEGER NOT NULL,
    PRIMARY KEY (room_id, edu_type, user_id, receipt_type)
);

INSERT OR REPLACE INTO ephemeral_per_user
    (room_id, edu_type, user_id, receipt_type, content_json, typing, stream_pos)
SELECT room_id, 'm.typing', json_extract(content_json, '$.user_id'), '', content_json,
       json_type(content_json, '$.typing') = 'true', stream_pos
FROM ephemeral
WHERE edu_type = 'm.typing' AND json_valid(content_json)
  AND json_type(content_json, '$.user_id') = 'text';

-- An old receipt row may hold several users and receipt types: one row each (they keep the
-- old row's stream position).
INSERT OR REPLACE INTO ephemeral_per_user
    (room_id, edu_type, user_id, receipt_type, content_json, typing, stream_pos)
SELECT e.room_id, 'm.receipt', u.key, t.key,
       json_object(t.key, json_object(u.key, json(u.value))), 0, e.stream_pos
FROM ephemeral e, json_each(e.content_json) t, json_each(t.value) u
WHERE e.edu_type = 'm.receipt' AND json_valid(e.content_json)
  AND json_type(e.content_json) = 'object'
  AND t.type = 'object' AND u.type = 'object';

DROP TABLE ephemeral;
ALTER TABLE ephemeral_per_user RENAME TO ephemeral;
CREATE INDEX ephemeral_pos ON ephemeral (stream_pos);
CREATE INDEX ephemeral_room ON ephemeral (room_id, stream_pos);
CREATE INDEX ephemeral_typing ON ephemeral (typing) WHERE typing = 1;
