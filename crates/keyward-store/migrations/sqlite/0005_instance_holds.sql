CREATE TABLE instance_holds (
    scope TEXT NOT NULL,
    instance TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, instance)
);
