-- Hypervisor hosts as members of the service: the hosts (an admin-owned body and an
-- agent-owned report), single-use join tokens, shared secrets (the host CA), and per-Cloud PC
-- columns for what placement sums per host.

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    subnet_index INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    report TEXT,
    heartbeat_at TEXT
);
CREATE UNIQUE INDEX hosts_name ON hosts (lower(name));
CREATE UNIQUE INDEX hosts_subnet ON hosts (subnet_index) WHERE subnet_index > 0;

CREATE TABLE host_join_tokens (
    secret_sha256 TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

ALTER TABLE cloud_pcs ADD COLUMN host TEXT;
ALTER TABLE cloud_pcs ADD COLUMN vcpus INTEGER NOT NULL DEFAULT 0;
ALTER TABLE cloud_pcs ADD COLUMN memory_mib INTEGER NOT NULL DEFAULT 0;
ALTER TABLE cloud_pcs ADD COLUMN storage_gib INTEGER NOT NULL DEFAULT 0;
UPDATE cloud_pcs SET
    host = json_extract(state, '$.resources.host'),
    vcpus = COALESCE(json_extract(state, '$.spec.vcpus'), 0),
    memory_mib = COALESCE(json_extract(state, '$.spec.memoryMib'), 0),
    storage_gib = COALESCE(json_extract(state, '$.spec.storageGib'), 0);
CREATE INDEX cloud_pcs_host ON cloud_pcs (host);
