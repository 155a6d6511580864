-- Receipt checks 4-6 (docs/federation.md): every stored event has an auth status.
-- 'accepted': allowed (shown where the stream or a gap fill holds it; usable as an auth event);
-- 'soft_failed': allowed by its auth events but not by the room's current state when it
-- arrived: kept (a valid part of the DAG, usable as an auth event) but never shown;
-- 'rejected': not allowed: kept only so that it is not fetched again and so that events
-- citing it are rejected too; never shown, never used as an auth event.
ALTER TABLE events ADD COLUMN auth_status TEXT NOT NULL DEFAULT 'accepted';
ALTER TABLE events ADD COLUMN auth_reason TEXT;
