-- keygate schema, SQLite (the embedded single-node store). Same tables and guarantees as the
-- Postgres schema; there are no other processes to notify, so no change feed.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    active        BOOLEAN NOT NULL DEFAULT TRUE,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- AUTOINCREMENT: ids are never reused after a delete (a deleted key's id, printed inside the
-- clear key, must never name another key).
CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    secret_hash  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT,
    enabled      BOOLEAN NOT NULL DEFAULT TRUE,
    last_used_at TEXT,
    created_by   TEXT NOT NULL
);

CREATE TABLE auth_mode (
    singleton        INTEGER PRIMARY KEY CHECK (singleton = 1),
    api_keys_enabled BOOLEAN NOT NULL DEFAULT FALSE,
    locked_at        TEXT,
    CHECK (api_keys_enabled = (locked_at IS NOT NULL))
);
INSERT INTO auth_mode (singleton, api_keys_enabled, locked_at) VALUES (1, FALSE, NULL);

-- Once set, the lockout flag can never be cleared, nor its row removed.
CREATE TRIGGER auth_mode_no_clear BEFORE UPDATE ON auth_mode
    WHEN OLD.api_keys_enabled
         AND (NOT NEW.api_keys_enabled OR NEW.locked_at IS NOT OLD.locked_at)
BEGIN
    SELECT RAISE(ABORT, 'keygate: the basic-auth lockout flag cannot be cleared once set');
END;
CREATE TRIGGER auth_mode_no_delete BEFORE DELETE ON auth_mode
BEGIN
    SELECT RAISE(ABORT, 'keygate: the auth_mode row cannot be removed');
END;
