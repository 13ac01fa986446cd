-- Keys are verified by the SHA-256 digest of the whole clear key (SPEC version 2, section 1).
-- Keys made by version 1 keep their argon2id hash until their first successful use, when
-- keygate writes the digest and clears the hash in one statement; from then on a row holds
-- exactly one of the two.
ALTER TABLE api_keys
    ADD COLUMN secret_digest BYTEA CHECK (octet_length(secret_digest) = 32),
    ALTER COLUMN secret_hash DROP NOT NULL,
    ADD CONSTRAINT api_keys_one_secret CHECK ((secret_digest IS NULL) <> (secret_hash IS NULL));

-- A new secret is a change every replica must hear of, whichever column holds it.
DROP TRIGGER api_keys_notify_update ON api_keys;
CREATE TRIGGER api_keys_notify_update AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.enabled IS DISTINCT FROM NEW.enabled
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.name IS DISTINCT FROM NEW.name
          OR OLD.secret_hash IS DISTINCT FROM NEW.secret_hash
          OR OLD.secret_digest IS DISTINCT FROM NEW.secret_digest
          OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION keygate_notify_key_change();
