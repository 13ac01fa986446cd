-- keygate schema, Postgres. Applied at start-up by `sqlx::migrate!` (which serialises concurrent
-- replicas with an advisory lock).

CREATE TABLE users (
    id            BIGSERIAL PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    active        BOOLEAN NOT NULL DEFAULT TRUE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- BIGSERIAL never hands out an id twice, even after deletes: a deleted key's id (which is
-- printed inside the clear key) must never name another key.
CREATE TABLE api_keys (
    id           BIGSERIAL PRIMARY KEY,
    name         TEXT NOT NULL CHECK (char_length(name) BETWEEN 1 AND 128),
    secret_hash  TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ,
    enabled      BOOLEAN NOT NULL DEFAULT TRUE,
    last_used_at TIMESTAMPTZ,
    created_by   TEXT NOT NULL
);

-- The basic-auth lockout flag: exactly one row, false on a new install.
CREATE TABLE auth_mode (
    singleton        BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    api_keys_enabled BOOLEAN NOT NULL DEFAULT FALSE,
    locked_at        TIMESTAMPTZ,
    CHECK (api_keys_enabled = (locked_at IS NOT NULL))
);
INSERT INTO auth_mode DEFAULT VALUES;

-- Once set, the flag can never be cleared, nor its row removed: not by keygate, not by a stray
-- UPDATE in psql. Only a migration that drops this trigger could, and none does.
CREATE FUNCTION keygate_guard_auth_mode() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'TRUNCATE') THEN
        RAISE EXCEPTION 'keygate: the auth_mode row cannot be removed';
    END IF;
    IF OLD.api_keys_enabled
       AND (NOT NEW.api_keys_enabled OR NEW.locked_at IS DISTINCT FROM OLD.locked_at) THEN
        RAISE EXCEPTION 'keygate: the basic-auth lockout flag cannot be cleared once set';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER auth_mode_guard BEFORE UPDATE OR DELETE ON auth_mode
    FOR EACH ROW EXECUTE FUNCTION keygate_guard_auth_mode();
CREATE TRIGGER auth_mode_guard_truncate BEFORE TRUNCATE ON auth_mode
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_guard_auth_mode();

-- Change feed for the other replicas' caches. Raised by the database itself, so a change made
-- by any client (even psql) reaches them. last_used_at updates are not changes that matter to
-- a cache and are left out, or every usage flush would evict every replica's entries.
CREATE FUNCTION keygate_notify_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('keygate_changes', 'key:' || OLD.id);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('keygate_changes', 'key:' || NEW.id);
    RETURN NEW;
END;
$$;
CREATE TRIGGER api_keys_notify_insert_delete AFTER INSERT OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION keygate_notify_key_change();
CREATE TRIGGER api_keys_notify_update AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.enabled IS DISTINCT FROM NEW.enabled
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.name IS DISTINCT FROM NEW.name
          OR OLD.secret_hash IS DISTINCT FROM NEW.secret_hash
          OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION keygate_notify_key_change();

CREATE FUNCTION keygate_notify_auth_mode() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keygate_changes', 'auth_mode');
    RETURN NEW;
END;
$$;
CREATE TRIGGER auth_mode_notify AFTER UPDATE ON auth_mode
    FOR EACH ROW WHEN (OLD.api_keys_enabled IS DISTINCT FROM NEW.api_keys_enabled)
    EXECUTE FUNCTION keygate_notify_auth_mode();
