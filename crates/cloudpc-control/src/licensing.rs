//! Licenses: SKUs with a hardware size and seats, assigned to users directly or through groups.
//!
//! A user holds a SKU once however many ways it reaches them, and counts once against its seats.
//! Seats are checked by the store inside the assigning transaction, so two admins assigning the
//! last seat at once cannot both succeed.

use std::collections::{BTreeMap, HashMap, HashSet};

use uuid::Uuid;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::directory::{Group, User};
use cloudpc_types::licensing::{
    AssignLicenseRequest, LicenseAssignmentState, LicenseDetails, ServicePlanInfo, SkuCreate, SkuUpdate, SubscribedSku,
};

use crate::audit::{property, Actor, Change};
use crate::directory::parse_id;
use crate::error::reference;
use crate::{App, Error, Result};

fn sku_change(activity: &str, op: AuditOperationType, sku: &SubscribedSku) -> Change<'static> {
    Change {
        component: "Licensing",
        activity: format!("{activity} SubscribedSku"),
        operation: op,
        resource_type: "subscribedSku",
        resource_id: sku.id.to_string(),
        resource_name: sku.sku_part_number.clone(),
    }
}

/// The single Cloud PC service plan each cloudpc SKU carries; its id is the SKU's.
fn service_plan(sku: &SubscribedSku) -> ServicePlanInfo {
    ServicePlanInfo {
        service_plan_id: sku.sku_id,
        service_plan_name: format!("CPC_{}C_{}GB_{}GB", sku.v_cpu_count, sku.ram_in_gb, sku.storage_in_gb),
        provisioning_status: "Success".into(),
        applies_to: "User".into(),
    }
}

impl App {
    pub async fn list_skus(&self) -> Result<Vec<SubscribedSku>> {
        let consumed = self.store.consumed_units().await?;
        let mut skus = self.store.list_skus().await?;
        for sku in &mut skus {
            sku.consumed_units = consumed.get(&sku.id).copied().unwrap_or(0);
        }
        Ok(skus)
    }

    pub async fn get_sku(&self, id: &str) -> Result<SubscribedSku> {
        let mut sku = self.store.get_sku(parse_id("subscribedSku", id)?).await?;
        sku.consumed_units = self.store.consumed_units().await?.get(&sku.id).copied().unwrap_or(0);
        Ok(sku)
    }

    pub async fn create_sku(&self, actor: &Actor, input: SkuCreate) -> Result<SubscribedSku> {
        let id = Uuid::new_v4();
        let mut sku = SubscribedSku {
            row_version: 0,
            id,
            sku_id: id,
            display_name: input.display_name.unwrap_or_else(|| input.sku_part_number.clone()),
            sku_part_number: input.sku_part_number,
            applies_to: "User".into(),
            capability_status: "Enabled".into(),
            consumed_units: 0,
            prepaid_units: input.prepaid_units,
            v_cpu_count: input.v_cpu_count,
            ram_in_gb: input.ram_in_gb,
            storage_in_gb: input.storage_in_gb,
            service_plans: vec![],
        };
        sku.service_plans = vec![service_plan(&sku)];
        sku.validate()?;
        let audit = sku_change("Create", AuditOperationType::Create, &sku).event(actor, None, Some(&sku));
        self.store.create_sku(&sku, &audit).await?;
        Ok(sku)
    }

    /// Changing the size affects Cloud PCs provisioned from now on, never existing ones.
    pub async fn update_sku(&self, actor: &Actor, id: &str, input: SkuUpdate) -> Result<SubscribedSku> {
        let before = self.get_sku(id).await?;
        let mut sku = before.clone();
        if let Some(v) = input.sku_part_number {
            sku.sku_part_number = v;
        }
        if let Some(v) = input.display_name {
            sku.display_name = v;
        }
        if let Some(v) = input.prepaid_units {
            sku.prepaid_units = v;
        }
        if let Some(v) = input.v_cpu_count {
            sku.v_cpu_count = v;
        }
        if let Some(v) = input.ram_in_gb {
            sku.ram_in_gb = v;
        }
        if let Some(v) = input.storage_in_gb {
            sku.storage_in_gb = v;
        }
        sku.service_plans = vec![service_plan(&sku)];
        sku.validate()?;
        if sku.prepaid_units.enabled < before.consumed_units {
            let n = before.consumed_units;
            return Err(Error::Conflict(format!(
                "prepaidUnits.enabled cannot go below the {n} seat{} in use; remove licenses first",
                if n == 1 { "" } else { "s" }
            )));
        }
        let audit = sku_change("Update", AuditOperationType::Patch, &sku).event(actor, Some(&before), Some(&sku));
        self.store.update_sku(&sku, &audit).await?;
        Ok(sku)
    }

    pub async fn delete_sku(&self, actor: &Actor, id: &str) -> Result<()> {
        let sku = self.get_sku(id).await?;
        let audit = sku_change("Delete", AuditOperationType::Delete, &sku).event(actor, Some(&sku), None);
        Ok(self.store.delete_sku(sku.id, &audit).await?)
    }

    /// Checks an assignLicense body: SKUs exist, nothing is both added and removed.
    async fn check_license_request(&self, req: &AssignLicenseRequest) -> Result<(Vec<Uuid>, Vec<Uuid>, Vec<String>)> {
        let skus: HashMap<Uuid, SubscribedSku> =
            self.store.list_skus().await?.into_iter().map(|s| (s.sku_id, s)).collect();
        let mut names = Vec::new();
        let mut seen = HashSet::new();
        for (i, l) in req.add_licenses.iter().enumerate() {
            let sku = skus.get(&l.sku_id).ok_or_else(|| {
                Error::invalid(format!("addLicenses[{i}].skuId"), format!("SKU '{}' does not exist", l.sku_id))
            })?;
            if !l.disabled_plans.is_empty() {
                return Err(Error::invalid(
                    format!("addLicenses[{i}].disabledPlans"),
                    "cannot disable the Cloud PC plan of a cloudpc SKU; leave it empty",
                ));
            }
            if !seen.insert(l.sku_id) {
                return Err(Error::invalid(format!("addLicenses[{i}].skuId"), "lists the same SKU twice"));
            }
            names.push(format!("+{}", sku.sku_part_number));
        }
        for (i, id) in req.remove_licenses.iter().enumerate() {
            let sku = skus
                .get(id)
                .ok_or_else(|| Error::invalid(format!("removeLicenses[{i}]"), format!("SKU '{id}' does not exist")))?;
            if !seen.insert(*id) {
                return Err(Error::invalid(
                    format!("removeLicenses[{i}]"),
                    "names a SKU that is also added or listed twice",
                ));
            }
            names.push(format!("-{}", sku.sku_part_number));
        }
        let add = req.add_licenses.iter().map(|l| l.sku_id).collect();
        Ok((add, req.remove_licenses.clone(), names))
    }

    pub async fn assign_user_license(&self, actor: &Actor, user: &str, req: AssignLicenseRequest) -> Result<User> {
        let user = self.get_user(user).await?;
        let (add, remove, names) = self.check_license_request(&req).await?;
        let audit = Change {
            component: "Licensing",
            activity: "Assign license to User".into(),
            operation: AuditOperationType::Other,
            resource_type: "user",
            resource_id: user.id.to_string(),
            resource_name: user.user_principal_name.clone(),
        }
        .event_with(actor, vec![property("assignedLicenses", None, Some(names.join(" ")))]);
        self.store.change_user_licenses(user.id, &add, &remove, &audit).await?;
        self.changed();
        Ok(user)
    }

    pub async fn assign_group_license(&self, actor: &Actor, group: &str, req: AssignLicenseRequest) -> Result<Group> {
        let group = self.get_group(group).await?;
        let (add, remove, names) = self.check_license_request(&req).await?;
        let audit = Change {
            component: "Licensing",
            activity: "Assign license to Group".into(),
            operation: AuditOperationType::Other,
            resource_type: "group",
            resource_id: group.id.to_string(),
            resource_name: group.display_name.clone(),
        }
        .event_with(actor, vec![property("assignedLicenses", None, Some(names.join(" ")))]);
        self.store.change_group_licenses(group.id, &add, &remove, &audit).await?;
        self.changed();
        Ok(group)
    }

    pub async fn group_license_skus(&self, group: &str) -> Result<Vec<SubscribedSku>> {
        let group = self.get_group(group).await?;
        let ids = self.store.group_licenses(group.id).await?;
        let mut out = Vec::new();
        for id in ids {
            out.push(self.store.get_sku(id).await.map_err(Error::from).map_err(reference("skuId"))?);
        }
        Ok(out)
    }

    /// `/users/{id}/licenseDetails`: one entry per SKU the user holds, however it reaches them.
    pub async fn license_details(&self, user: &str) -> Result<Vec<LicenseDetails>> {
        let user = self.get_user(user).await?;
        let skus: HashMap<Uuid, SubscribedSku> = self.store.list_skus().await?.into_iter().map(|s| (s.id, s)).collect();
        let mut by_sku: BTreeMap<Uuid, Vec<LicenseAssignmentState>> = BTreeMap::new();
        for g in self.store.license_grants().await?.into_iter().filter(|g| g.user_id == user.id) {
            by_sku.entry(g.sku_id).or_default().push(LicenseAssignmentState {
                sku_id: g.sku_id,
                assigned_by_group: g.via_group,
                state: "Active".into(),
            });
        }
        Ok(by_sku
            .into_iter()
            .filter_map(|(sku_id, states)| {
                let sku = skus.get(&sku_id)?;
                Some(LicenseDetails {
                    id: format!("{}_{}", user.id, sku_id),
                    sku_id,
                    sku_part_number: sku.sku_part_number.clone(),
                    service_plans: sku.service_plans.clone(),
                    license_assignment_states: states,
                })
            })
            .collect())
    }
}
