-- Facts about this installation: which server name owns the database, when it was created.
-- (PostgreSQL schema; the same tables as store/sqlite/migrations/, numbered alike.)
CREATE TABLE server_info (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
