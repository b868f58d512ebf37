-- Network connections (Graph's onPremisesConnections): the organisation's network and Active
-- Directory domain. The domain password is kept only sealed (AES-256-GCM under the settings'
-- key), never in the body that the API shows.

CREATE TABLE network_connections (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1,
    sealed_password TEXT
);
CREATE UNIQUE INDEX network_connections_name ON network_connections (lower(name));
