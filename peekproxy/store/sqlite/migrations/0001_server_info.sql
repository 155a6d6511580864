-- Facts about this installation: which server name owns the database, when it was created.
CREATE TABLE server_info (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
