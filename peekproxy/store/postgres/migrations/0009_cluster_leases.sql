-- Several instances on one database (docs/cluster.md). The same schema (BIGINT for INTEGER) is in
-- peekproxy/store/sqlite/migrations/0009_cluster_leases.sql.

-- Which instance follows each remote room (peeks, renews, re-peeks, DELETEs), until when (ms).
-- end_reason: another instance saw the room stop being peekable; the owner ends it.
CREATE TABLE subscription_leases (
    room_id    TEXT PRIMARY KEY NOT NULL,
    owner      TEXT NOT NULL,
    expires_ts BIGINT NOT NULL,
    end_reason TEXT
);
CREATE INDEX subscription_leases_owner ON subscription_leases (owner);

-- Each device's last /sync on any instance (ms), written at most every idle_timeout / 4:
-- the idle reaper of every instance reads it.
CREATE TABLE device_last_sync (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    synced_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
