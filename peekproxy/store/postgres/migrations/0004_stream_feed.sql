-- Lookups by stream position for the commit feed (as store/sqlite/migrations/0004).
CREATE INDEX device_peeks_changed ON device_peeks (changed_pos);
CREATE INDEX ephemeral_pos ON ephemeral (stream_pos);
