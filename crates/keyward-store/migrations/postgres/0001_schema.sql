CREATE TABLE meta (k TEXT COLLATE "C" PRIMARY KEY, v BYTEA NOT NULL);
CREATE TABLE keys (
    id BYTEA PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    algorithm TEXT NOT NULL,
    state TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    current_version BIGINT NOT NULL,
    rotate_every_secs BIGINT,
    next_rotation_at BIGINT,
    deletion_at BIGINT,
    revision BIGINT NOT NULL
);
CREATE INDEX keys_next_rotation ON keys(next_rotation_at) WHERE next_rotation_at IS NOT NULL;
CREATE INDEX keys_deletion ON keys(deletion_at) WHERE deletion_at IS NOT NULL;
CREATE TABLE key_versions (
    key_id BYTEA NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    wrapped_material BYTEA NOT NULL,
    public_key BYTEA,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE secrets (
    path TEXT COLLATE "C" PRIMARY KEY,
    current_version BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE secret_versions (
    path TEXT COLLATE "C" NOT NULL REFERENCES secrets(path) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    wrapped_value BYTEA,
    created_at BIGINT NOT NULL,
    deleted_at BIGINT,
    PRIMARY KEY (path, version)
);
CREATE TABLE tokens (
    hash BYTEA PRIMARY KEY,
    accessor TEXT COLLATE "C" NOT NULL UNIQUE,
    policies TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    parent TEXT,
    ttl_secs BIGINT,
    max_uses BIGINT,
    uses BIGINT NOT NULL DEFAULT 0,
    display_name TEXT NOT NULL DEFAULT '',
    selectors TEXT NOT NULL DEFAULT '',
    max_expires_at BIGINT
);
CREATE TABLE policies (
    name TEXT COLLATE "C" PRIMARY KEY,
    document TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
