CREATE TABLE keyward_instance_holds (
    scope TEXT COLLATE "C" NOT NULL,
    instance TEXT COLLATE "C" NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (scope, instance)
);
