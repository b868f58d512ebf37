//! Provisioning policies and their ordered group assignments.
//!
//! Rules: the name is free of `< > & | " ^`; the naming template expands to a valid name; the image
//! exists and is ready; `provisioningType` never changes; a policy with assignments cannot be
//! deleted. A policy is a recipe: editing it changes nothing that was already provisioned.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use uuid::Uuid;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::images::{DeviceImageStatus, GalleryImageStatus};
use cloudpc_types::network::HealthCheckStatus;
use cloudpc_types::policy::{
    self, AssignRequest, AssignmentTarget, DomainJoinConfiguration, DomainJoinType, ImageType, PolicyAssignment,
    ProvisioningPolicy, ProvisioningPolicyCreate, ProvisioningPolicyUpdate, ProvisioningType, WindowsSetting,
};

use crate::audit::{property, Actor, Change};
use crate::directory::parse_id;
use crate::{App, Error, Result};

fn policy_change(activity: &str, op: AuditOperationType, p: &ProvisioningPolicy) -> Change<'static> {
    Change {
        component: "ProvisioningPolicy",
        activity: format!("{activity} ProvisioningPolicy"),
        operation: op,
        resource_type: "cloudPcProvisioningPolicy",
        resource_id: p.id.to_string(),
        resource_name: p.display_name.clone(),
    }
}

fn check_join_configurations(list: &[DomainJoinConfiguration]) -> Result<()> {
    if list.is_empty() {
        return Err(Error::invalid("domainJoinConfigurations", "needs at least one entry"));
    }
    if list.len() > 16 {
        return Err(Error::invalid("domainJoinConfigurations", "may list at most 16 entries"));
    }
    for (i, c) in list.iter().enumerate() {
        if c.domain_join_type == DomainJoinType::HybridAzureAdJoin && c.on_premises_connection_id.is_none() {
            return Err(Error::invalid(
                format!("domainJoinConfigurations[{i}].onPremisesConnectionId"),
                "is required for hybridAzureADJoin: name the network connection of the domain to join",
            ));
        }
        let region_ok = c.region_name.len() <= 64
            && !c.region_name.is_empty()
            && c.region_name.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-');
        if !region_ok {
            return Err(Error::invalid(
                format!("domainJoinConfigurations[{i}].regionName"),
                "must be 'automatic' or a region name of lowercase letters, digits and hyphens",
            ));
        }
    }
    Ok(())
}

fn check_locale(setting: &WindowsSetting) -> Result<()> {
    let ok = match setting.locale.split_once('-') {
        Some((lang, region)) => {
            (2..=3).contains(&lang.len())
                && lang.chars().all(|c| c.is_ascii_lowercase())
                && (2..=4).contains(&region.len())
                && region.chars().all(|c| c.is_ascii_alphanumeric())
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("windowsSetting.locale", format!("must look like en-US, not '{}'", setting.locale)))
    }
}

fn check_grace(hours: Option<u32>) -> Result<()> {
    match hours {
        Some(h) if !(1..=8760).contains(&h) => {
            Err(Error::invalid("gracePeriodInHours", format!("must be between 1 and 8760 hours, not {h}")))
        }
        _ => Ok(()),
    }
}

fn check_time_zone(zone: Option<&str>) -> Result<()> {
    let Some(z) = zone else { return Ok(()) };
    let ok = !z.is_empty()
        && z.len() <= 64
        && !z.contains("..")
        && !z.starts_with('/')
        && z.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("timeZone", format!("must be an IANA time zone name such as Europe/Berlin, not '{z}'")))
    }
}

/// From a minute to a week: shorter would save desktops between two clicks.
fn check_hibernate(minutes: Option<u32>) -> Result<()> {
    match minutes {
        Some(m) if !(1..=10080).contains(&m) => Err(Error::invalid(
            "hibernateAfterMinutes",
            format!("must be between 1 and 10080 minutes (a week), not {m}; leave it out to never hibernate"),
        )),
        _ => Ok(()),
    }
}

/// Pool machines hold a host's resources while nobody uses them: a few per license is what a
/// burst of new starters needs.
pub const MAX_WARM_POOL: u32 = 20;

fn check_warm_pool(size: u32) -> Result<()> {
    if size > MAX_WARM_POOL {
        return Err(Error::invalid(
            "warmPoolSize",
            format!("must be between 0 and {MAX_WARM_POOL} machines per license, not {size}"),
        ));
    }
    Ok(())
}

fn check_all(p: &ProvisioningPolicy) -> Result<()> {
    policy::validate_fields(&p.display_name, &p.description, p.cloud_pc_naming_template.as_deref())?;
    check_join_configurations(&p.domain_join_configurations)?;
    check_locale(&p.windows_setting)?;
    check_grace(p.grace_period_in_hours)?;
    check_hibernate(p.hibernate_after_minutes)?;
    check_warm_pool(p.warm_pool_size)?;
    check_time_zone(p.time_zone.as_deref())
}

impl App {
    /// Every network connection the policy names exists, has the join type the entry asks for,
    /// serves the entry's region, and has passed its health checks (warnings allowed), as
    /// Windows 365 requires before a policy may use a connection.
    async fn check_connections(&self, list: &[DomainJoinConfiguration]) -> Result<()> {
        if list.iter().all(|c| c.on_premises_connection_id.is_none()) {
            return Ok(());
        }
        let connections = self.list_network_connections().await?;
        for (i, entry) in list.iter().enumerate() {
            let Some(id) = entry.on_premises_connection_id.as_deref() else { continue };
            let field = format!("domainJoinConfigurations[{i}].onPremisesConnectionId");
            let Some(c) = connections.iter().find(|c| c.id.to_string().eq_ignore_ascii_case(id)) else {
                return Err(Error::invalid(
                    field,
                    format!("refers to network connection '{id}', which does not exist"),
                ));
            };
            if c.connection_type != entry.domain_join_type {
                return Err(Error::invalid(
                    format!("domainJoinConfigurations[{i}].domainJoinType"),
                    format!(
                        "does not match the network connection '{}', which is {}",
                        c.display_name,
                        cloudpc_types::network::wire_name(&c.connection_type)
                    ),
                ));
            }
            if entry.region_name != "automatic" && entry.region_name != c.region_name {
                return Err(Error::invalid(
                    format!("domainJoinConfigurations[{i}].regionName"),
                    format!(
                        "must be 'automatic' or '{}', the region of the network connection '{}'",
                        c.region_name, c.display_name
                    ),
                ));
            }
            if !matches!(c.health_check_status, HealthCheckStatus::Passed | HealthCheckStatus::Warning) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "refers to the network connection '{}', whose health checks have not passed (they are {}); \
                         run them (runHealthChecks) and fix what they report",
                        c.display_name,
                        cloudpc_types::network::wire_name(&c.health_check_status)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Returns the image's display name if it can be used by a policy right now.
    async fn usable_image(&self, image_type: ImageType, image_id: &str) -> Result<String> {
        let missing = || Error::invalid("imageId", format!("image '{image_id}' does not exist"));
        match image_type {
            ImageType::Custom => {
                let id = Uuid::parse_str(image_id).map_err(|_| missing())?;
                let image = self.store.get_device_image(id).await.map_err(|_| missing())?;
                if image.status != DeviceImageStatus::Ready {
                    return Err(Error::invalid(
                        "imageId",
                        format!(
                            "image '{}' is {:?}, not ready; only ready images can be used",
                            image.display_name, image.status
                        )
                        .to_lowercase(),
                    ));
                }
                Ok(image.display_name)
            }
            ImageType::Gallery => {
                let image = self.store.get_gallery_image(image_id).await.map_err(|_| missing())?;
                if image.status == GalleryImageStatus::NotSupported {
                    return Err(Error::invalid(
                        "imageId",
                        format!("gallery image '{}' is no longer supported", image.display_name),
                    ));
                }
                Ok(image.display_name)
            }
        }
    }

    pub async fn list_policies(&self, expand_assignments: bool) -> Result<Vec<ProvisioningPolicy>> {
        let mut policies = self.store.list_policies().await?;
        if expand_assignments {
            let mut by_policy = self.assignments_by_policy().await?;
            for p in &mut policies {
                p.assignments = Some(by_policy.remove(&p.id).unwrap_or_default());
            }
        }
        Ok(policies)
    }

    pub async fn get_policy(&self, id: &str, expand_assignments: bool) -> Result<ProvisioningPolicy> {
        let mut p = self.store.get_policy(parse_id("provisioningPolicy", id)?).await?;
        if expand_assignments {
            p.assignments = Some(self.assignments_by_policy().await?.remove(&p.id).unwrap_or_default());
        }
        Ok(p)
    }

    pub async fn policy_assignments(&self, id: &str) -> Result<Vec<PolicyAssignment>> {
        Ok(self.get_policy(id, true).await?.assignments.unwrap_or_default())
    }

    async fn assignments_by_policy(&self) -> Result<HashMap<Uuid, Vec<PolicyAssignment>>> {
        let mut rows = self.store.list_assignments().await?;
        rows.sort_by_key(|a| (a.policy_id, a.position));
        let mut out: HashMap<Uuid, Vec<PolicyAssignment>> = HashMap::new();
        for a in rows {
            out.entry(a.policy_id).or_default().push(PolicyAssignment {
                id: format!("{}_{}", a.policy_id, a.group_id),
                target: AssignmentTarget {
                    odata_type: "#microsoft.graph.cloudPcManagementGroupAssignmentTarget".into(),
                    group_id: a.group_id,
                },
                assigned_date_time: a.assigned_at,
            });
        }
        Ok(out)
    }

    pub async fn create_policy(&self, actor: &Actor, input: ProvisioningPolicyCreate) -> Result<ProvisioningPolicy> {
        let now = Utc::now();
        let mut p = ProvisioningPolicy {
            row_version: 0,
            id: Uuid::new_v4(),
            display_name: input.display_name,
            description: input.description.unwrap_or_default(),
            image_display_name: String::new(),
            image_id: input.image_id,
            image_type: input.image_type,
            cloud_pc_naming_template: input.cloud_pc_naming_template,
            enable_single_sign_on: input.enable_single_sign_on.unwrap_or(false),
            local_admin_enabled: input.local_admin_enabled.unwrap_or(false),
            provisioning_type: input.provisioning_type.unwrap_or(ProvisioningType::Dedicated),
            domain_join_configurations: input.domain_join_configurations.unwrap_or_else(|| {
                vec![DomainJoinConfiguration {
                    domain_join_type: DomainJoinType::AzureAdJoin,
                    region_name: "automatic".into(),
                    region_group: None,
                    on_premises_connection_id: None,
                }]
            }),
            windows_setting: input.windows_setting.unwrap_or_default(),
            managed_by: "windows365".into(),
            grace_period_in_hours: input.grace_period_in_hours,
            time_zone: input.time_zone,
            hibernate_after_minutes: input.hibernate_after_minutes,
            warm_pool_size: input.warm_pool_size.unwrap_or(0),
            created_date_time: now,
            last_modified_date_time: now,
            assignments: None,
        };
        check_all(&p)?;
        self.check_connections(&p.domain_join_configurations).await?;
        p.image_display_name = self.usable_image(p.image_type, &p.image_id).await?;
        let audit = policy_change("Create", AuditOperationType::Create, &p).event(actor, None, Some(&p));
        self.store.create_policy(&p, &audit).await?;
        Ok(p)
    }

    pub async fn update_policy(
        &self,
        actor: &Actor,
        id: &str,
        input: ProvisioningPolicyUpdate,
    ) -> Result<ProvisioningPolicy> {
        let before = self.get_policy(id, false).await?;
        if let Some(t) = input.provisioning_type {
            if t != before.provisioning_type {
                return Err(Error::invalid(
                    "provisioningType",
                    "cannot change after the policy is created; create a new policy instead",
                ));
            }
        }
        let mut p = before.clone();
        if let Some(v) = input.display_name {
            p.display_name = v;
        }
        if let Some(v) = input.description {
            p.description = v;
        }
        let image_changed = input.image_id.is_some() || input.image_type.is_some();
        if let Some(v) = input.image_id {
            p.image_id = v;
        }
        if let Some(v) = input.image_type {
            p.image_type = v;
        }
        if let Some(v) = input.cloud_pc_naming_template {
            p.cloud_pc_naming_template = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = input.enable_single_sign_on {
            p.enable_single_sign_on = v;
        }
        if let Some(v) = input.local_admin_enabled {
            p.local_admin_enabled = v;
        }
        let joins_changed = input.domain_join_configurations.is_some();
        if let Some(v) = input.domain_join_configurations {
            p.domain_join_configurations = v;
        }
        if let Some(v) = input.windows_setting {
            p.windows_setting = v;
        }
        if let Some(v) = input.grace_period_in_hours {
            p.grace_period_in_hours = Some(v);
        }
        if let Some(v) = input.time_zone {
            p.time_zone = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = input.hibernate_after_minutes {
            p.hibernate_after_minutes = (v != 0).then_some(v);
        }
        if let Some(v) = input.warm_pool_size {
            p.warm_pool_size = v;
        }
        check_all(&p)?;
        if joins_changed {
            self.check_connections(&p.domain_join_configurations).await?;
        }
        if image_changed {
            p.image_display_name = self.usable_image(p.image_type, &p.image_id).await?;
        }
        p.last_modified_date_time = Utc::now();
        let audit = policy_change("Update", AuditOperationType::Patch, &p).event(actor, Some(&before), Some(&p));
        self.store.update_policy(&p, &audit).await?;
        // Its warm pool follows at once (size, or machines built from the old settings).
        self.changed();
        Ok(p)
    }

    pub async fn delete_policy(&self, actor: &Actor, id: &str) -> Result<()> {
        let p = self.get_policy(id, false).await?;
        let audit = policy_change("Delete", AuditOperationType::Delete, &p).event(actor, Some(&p), None);
        Ok(self.store.delete_policy(p.id, &audit).await?)
    }

    /// Replaces the policy's targets with the given groups, in the given order.
    pub async fn assign_policy(&self, actor: &Actor, id: &str, req: AssignRequest) -> Result<Vec<PolicyAssignment>> {
        let p = self.get_policy(id, true).await?;
        let mut seen = HashSet::new();
        let mut groups = Vec::new();
        for (i, a) in req.assignments.iter().enumerate() {
            let field = format!("assignments[{i}].target.groupId");
            if a.target.odata_type != "#microsoft.graph.cloudPcManagementGroupAssignmentTarget" {
                return Err(Error::invalid(
                    format!("assignments[{i}].target.@odata.type"),
                    "must be #microsoft.graph.cloudPcManagementGroupAssignmentTarget",
                ));
            }
            if !seen.insert(a.target.group_id) {
                return Err(Error::invalid(field, "names a group that is already in the list"));
            }
            self.store
                .get_group(a.target.group_id)
                .await
                .map_err(|_| Error::invalid(field, format!("group '{}' does not exist", a.target.group_id)))?;
            groups.push(a.target.group_id);
        }
        let show = |ids: Vec<Uuid>| Some(ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(", "));
        let old: Vec<Uuid> = p.assignments.iter().flatten().map(|a| a.target.group_id).collect();
        let audit = policy_change("Assign", AuditOperationType::Other, &p)
            .event_with(actor, vec![property("assignments", show(old), show(groups.clone()))]);
        self.store.set_policy_assignments(p.id, &groups, &audit).await?;
        self.changed();
        self.policy_assignments(id).await
    }
}
