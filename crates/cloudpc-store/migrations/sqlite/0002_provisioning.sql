-- Provisioning: the workflow state next to each Cloud PC's Graph body, the steps as they ran,
-- the device records that directory join and enrollment make, and gallery image files.

ALTER TABLE cloud_pcs ADD COLUMN state TEXT NOT NULL DEFAULT '{}';
-- One Cloud PC per user and license.
CREATE UNIQUE INDEX cloud_pcs_user_sku ON cloud_pcs(user_id, sku_id);

CREATE TABLE provisioning_steps (
    cloud_pc_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    name TEXT NOT NULL,
    started_at TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (cloud_pc_id, generation, attempt, name)
);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    cloud_pc_id TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE managed_devices (
    id TEXT PRIMARY KEY,
    cloud_pc_id TEXT NOT NULL,
    body TEXT NOT NULL
);

ALTER TABLE gallery_images ADD COLUMN disk TEXT NOT NULL DEFAULT '';
ALTER TABLE gallery_images ADD COLUMN boot TEXT;
