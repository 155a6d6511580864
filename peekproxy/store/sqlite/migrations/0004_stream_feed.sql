-- Lookups by stream position for the commit feed that keeps the live window current
-- (peekproxy/peeks/live.py): which device peek and which EDU a new stream row belongs to.
CREATE INDEX device_peeks_changed ON device_peeks (changed_pos);
CREATE INDEX ephemeral_pos ON ephemeral (stream_pos);
