-- The foundation schema: each resource keeps its Graph-shaped body as JSON, next to the columns
-- that carry keys, uniqueness and references, so the database itself enforces the relationships.

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    upn TEXT NOT NULL UNIQUE COLLATE NOCASE,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE groups (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE group_members (
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    added_at TEXT NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_user ON group_members(user_id);

CREATE TABLE skus (
    id TEXT PRIMARY KEY,
    part_number TEXT NOT NULL UNIQUE COLLATE NOCASE,
    seats INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE user_licenses (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    sku_id TEXT NOT NULL REFERENCES skus(id),
    assigned_at TEXT NOT NULL,
    PRIMARY KEY (user_id, sku_id)
);

CREATE TABLE group_licenses (
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    sku_id TEXT NOT NULL REFERENCES skus(id),
    assigned_at TEXT NOT NULL,
    PRIMARY KEY (group_id, sku_id)
);

CREATE TABLE gallery_images (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);

CREATE TABLE device_images (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE provisioning_policies (
    id TEXT PRIMARY KEY,
    image_type TEXT NOT NULL,
    image_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL
);

-- position orders the groups within one assign call; assigned_at orders policies against each
-- other for first-assigned-wins and is kept when a group stays assigned across assign calls.
CREATE TABLE policy_assignments (
    policy_id TEXT NOT NULL REFERENCES provisioning_policies(id),
    group_id TEXT NOT NULL REFERENCES groups(id),
    position INTEGER NOT NULL,
    assigned_at TEXT NOT NULL,
    PRIMARY KEY (policy_id, group_id)
);

CREATE TABLE cloud_pcs (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    sku_id TEXT NOT NULL,
    policy_id TEXT,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE audit_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    at TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit events cannot be changed'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit events cannot be deleted'); END;

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL
);
