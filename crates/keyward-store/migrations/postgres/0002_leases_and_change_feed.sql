CREATE TABLE keyward_leases (
    name TEXT COLLATE "C" PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE keyward_change_seq (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    n BIGINT NOT NULL
);
INSERT INTO keyward_change_seq (n) VALUES (0);
CREATE TABLE keyward_changes (
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    ref BYTEA NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX keyward_changes_seq ON keyward_changes (seq);
CREATE INDEX keyward_changes_at ON keyward_changes (at);

CREATE FUNCTION keyward_next_change() RETURNS BIGINT LANGUAGE plpgsql AS $fn$
DECLARE s BIGINT;
BEGIN
    UPDATE keyward_change_seq SET n = n + 1 RETURNING n INTO s;
    PERFORM pg_notify('keyward_changes', s::text);
    RETURN s;
END
$fn$;
CREATE FUNCTION keyward_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        WITH s AS (SELECT keyward_next_change() AS n)
        INSERT INTO keyward_changes (seq, kind, ref) SELECT s.n, 'key', c.id FROM s, changed c;
    END IF;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION keyward_tokens_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        WITH s AS (SELECT keyward_next_change() AS n)
        INSERT INTO keyward_changes (seq, kind, ref) SELECT s.n, 'token', c.hash FROM s, changed c;
    END IF;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION keyward_token_renewed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO keyward_changes (seq, kind, ref) VALUES (keyward_next_change(), 'token', NEW.hash);
    RETURN NULL;
END
$fn$;
CREATE FUNCTION keyward_policies_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        WITH s AS (SELECT keyward_next_change() AS n)
        INSERT INTO keyward_changes (seq, kind, ref)
            SELECT s.n, 'policy', convert_to(c.name, 'UTF8') FROM s, changed c;
    END IF;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION keyward_meta_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        WITH s AS (SELECT keyward_next_change() AS n)
        INSERT INTO keyward_changes (seq, kind, ref) SELECT s.n, 'meta', convert_to(c.k, 'UTF8') FROM s, changed c;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER keys_inserted AFTER INSERT ON keys REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_keys_changed();
CREATE TRIGGER keys_updated AFTER UPDATE ON keys REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_keys_changed();
CREATE TRIGGER keys_deleted AFTER DELETE ON keys REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_keys_changed();
CREATE TRIGGER tokens_deleted AFTER DELETE ON tokens REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_tokens_changed();
CREATE TRIGGER tokens_renewed AFTER UPDATE ON tokens FOR EACH ROW
    WHEN (OLD.expires_at IS DISTINCT FROM NEW.expires_at) EXECUTE FUNCTION keyward_token_renewed();
CREATE TRIGGER policies_inserted AFTER INSERT ON policies REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_policies_changed();
CREATE TRIGGER policies_updated AFTER UPDATE ON policies REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_policies_changed();
CREATE TRIGGER policies_deleted AFTER DELETE ON policies REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_policies_changed();
CREATE TRIGGER meta_inserted AFTER INSERT ON meta REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_meta_changed();
CREATE TRIGGER meta_updated AFTER UPDATE ON meta REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_meta_changed();
