-- Desktops in seconds (issue 14). `saved`: the Cloud PC is hibernated, so its host counts its
-- memory as free and its save file against disk (placement sums it). `pool_ready_for`: the
-- policy whose warm pool this booted, unclaimed machine waits in; a claim clears it in the same
-- statement that gives the machine its user.
ALTER TABLE cloud_pcs ADD COLUMN saved BIGINT NOT NULL DEFAULT 0;
ALTER TABLE cloud_pcs ADD COLUMN pool_ready_for TEXT;
CREATE INDEX cloud_pcs_pool ON cloud_pcs (pool_ready_for, sku_id);
