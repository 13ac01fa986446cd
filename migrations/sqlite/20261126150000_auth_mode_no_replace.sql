-- `INSERT OR REPLACE` / `REPLACE INTO` resolve the primary-key conflict by deleting the existing
-- row, and SQLite fires no delete trigger for that (recursive_triggers is off), so they could
-- reset the lockout flag behind auth_mode_no_clear and auth_mode_no_delete. The row exists from
-- the first migration on: no insert into auth_mode is ever legitimate.
CREATE TRIGGER auth_mode_no_insert BEFORE INSERT ON auth_mode
BEGIN
    SELECT RAISE(ABORT, 'keygate: the auth_mode row cannot be replaced');
END;
