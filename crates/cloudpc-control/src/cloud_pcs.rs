//! Cloud PCs as the admin sees them. Provisioning fills this in (issue 3); for now it reads.

use cloudpc_types::audit::AuditEvent;
use cloudpc_types::cloud_pc::CloudPc;

use crate::directory::parse_id;
use crate::{App, Result};

impl App {
    pub async fn list_cloud_pcs(&self) -> Result<Vec<CloudPc>> {
        Ok(self.store.list_cloud_pcs().await?)
    }

    pub async fn get_cloud_pc(&self, id: &str) -> Result<CloudPc> {
        Ok(self.store.get_cloud_pc(parse_id("cloudPC", id)?).await?)
    }

    pub async fn list_audit_events(&self) -> Result<Vec<AuditEvent>> {
        Ok(self.store.list_audit_events().await?)
    }

    pub async fn get_audit_event(&self, id: &str) -> Result<AuditEvent> {
        let id = parse_id("auditEvent", id)?;
        self.list_audit_events()
            .await?
            .into_iter()
            .find(|e| e.id == id)
            .ok_or(crate::Error::NotFound { kind: "auditEvent", id: id.to_string() })
    }
}
