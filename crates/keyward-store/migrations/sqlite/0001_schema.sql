CREATE TABLE meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE keys (
    id BLOB PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    algorithm TEXT NOT NULL,
    state TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    current_version INTEGER NOT NULL,
    rotate_every_secs INTEGER,
    next_rotation_at INTEGER,
    deletion_at INTEGER,
    revision INTEGER NOT NULL
);
CREATE INDEX keys_next_rotation ON keys(next_rotation_at) WHERE next_rotation_at IS NOT NULL;
CREATE INDEX keys_deletion ON keys(deletion_at) WHERE deletion_at IS NOT NULL;
CREATE TABLE key_versions (
    key_id BLOB NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    wrapped_material BLOB NOT NULL,
    public_key BLOB,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE secrets (
    path TEXT PRIMARY KEY,
    current_version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE secret_versions (
    path TEXT NOT NULL REFERENCES secrets(path) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    wrapped_value BLOB,
    created_at INTEGER NOT NULL,
    deleted_at INTEGER,
    PRIMARY KEY (path, version)
);
CREATE TABLE tokens (
    hash BLOB PRIMARY KEY,
    accessor TEXT NOT NULL UNIQUE,
    policies TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
