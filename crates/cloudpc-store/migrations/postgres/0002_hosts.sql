-- Hypervisor hosts as members of the service: the hosts (an admin-owned body and an
-- agent-owned report), single-use join tokens, shared secrets (the host CA), and per-Cloud PC
-- columns for what placement sums per host.

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    subnet_index BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1,
    report TEXT,
    heartbeat_at TIMESTAMPTZ
);
CREATE UNIQUE INDEX hosts_name ON hosts (lower(name));
CREATE UNIQUE INDEX hosts_subnet ON hosts (subnet_index) WHERE subnet_index > 0;

CREATE TABLE host_join_tokens (
    secret_sha256 TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

ALTER TABLE cloud_pcs ADD COLUMN host TEXT;
ALTER TABLE cloud_pcs ADD COLUMN vcpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE cloud_pcs ADD COLUMN memory_mib BIGINT NOT NULL DEFAULT 0;
ALTER TABLE cloud_pcs ADD COLUMN storage_gib BIGINT NOT NULL DEFAULT 0;
UPDATE cloud_pcs SET
    host = state::jsonb #>> '{resources,host}',
    vcpus = COALESCE((state::jsonb #>> '{spec,vcpus}')::BIGINT, 0),
    memory_mib = COALESCE((state::jsonb #>> '{spec,memoryMib}')::BIGINT, 0),
    storage_gib = COALESCE((state::jsonb #>> '{spec,storageGib}')::BIGINT, 0);
CREATE INDEX cloud_pcs_host ON cloud_pcs (host);
