-- Keys are verified by the SHA-256 digest of the whole clear key (SPEC version 2, section 1).
-- Keys made by version 1 keep their argon2id hash until their first successful use, when
-- keygate writes the digest and clears the hash in one statement; from then on a row holds
-- exactly one of the two.
--
-- SQLite cannot drop a NOT NULL constraint in place, so the table is rebuilt. Its AUTOINCREMENT
-- high-water mark is carried over: the id of a deleted key (printed inside its clear key) must
-- never name another key, even when that key had the highest id.
CREATE TABLE api_keys_v2 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    secret_digest BLOB CHECK (length(secret_digest) = 32),
    secret_hash   TEXT,
    created_at    TEXT NOT NULL,
    expires_at    TEXT,
    enabled       BOOLEAN NOT NULL DEFAULT TRUE,
    last_used_at  TEXT,
    created_by    TEXT NOT NULL,
    CHECK ((secret_digest IS NULL) <> (secret_hash IS NULL))
);
INSERT INTO api_keys_v2 (id, name, secret_hash, created_at, expires_at, enabled, last_used_at, created_by)
    SELECT id, name, secret_hash, created_at, expires_at, enabled, last_used_at, created_by
    FROM api_keys;
DELETE FROM sqlite_sequence WHERE name = 'api_keys_v2';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'api_keys_v2', seq FROM sqlite_sequence WHERE name = 'api_keys';
DROP TABLE api_keys;
ALTER TABLE api_keys_v2 RENAME TO api_keys;
