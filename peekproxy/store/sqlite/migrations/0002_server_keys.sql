-- Other servers' ed25519 verify keys, as fetched from them or from a notary.
-- valid_until_ts: as published (ms); expired_ts: set for old_verify_keys (ms);
-- fetched_ts: when we got it (ms), for the 7-day validity cap.
CREATE TABLE server_keys (
    server_name    TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    key_base64     TEXT NOT NULL,
    valid_until_ts INTEGER NOT NULL,
    expired_ts     INTEGER,
    fetched_ts     INTEGER NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
