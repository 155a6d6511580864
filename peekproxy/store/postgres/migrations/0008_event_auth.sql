-- Every stored event has an auth status (as store/sqlite/migrations/0008).
ALTER TABLE events ADD COLUMN auth_status TEXT NOT NULL DEFAULT 'accepted';
ALTER TABLE events ADD COLUMN auth_reason TEXT;
