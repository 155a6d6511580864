-- Other servers' ed25519 verify keys (as store/sqlite/migrations/0002_server_keys.sql); ms.
CREATE TABLE server_keys (
    server_name    TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    key_base64     TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    expired_ts     BIGINT,
    fetched_ts     BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
