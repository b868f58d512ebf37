//! The quickstart: with `cloudpc server --demo`, a fresh installation gets a demo user, group,
//! license and policy on the first gallery image, so a newcomer can sign in to the portal and open
//! a Cloud PC at once. It runs only when the directory is empty, and says what it made.

use rand::Rng;

use cloudpc_types::directory::{GroupCreate, PasswordProfile, UserCreate};
use cloudpc_types::images::GalleryImage;
use cloudpc_types::licensing::{AssignLicenseRequest, AssignedLicenseInput, PrepaidUnits, SkuCreate};
use cloudpc_types::policy::{AssignRequest, AssignmentInput, AssignmentTarget, ImageType, ProvisioningPolicyCreate};

use crate::audit::Actor;
use crate::{App, Error, Result};

/// What the demo made, for the start-up message.
pub struct Demo {
    pub user_principal_name: String,
    pub password: String,
    pub summary: String,
}

fn demo_password() -> String {
    const CHARS: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    let body: String = (0..12).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect();
    format!("{body}-7a")
}

impl App {
    /// Sets up the demo unless the directory already has users. Returns `None` when it did nothing.
    pub async fn set_up_demo(&self) -> Result<Option<Demo>> {
        if !self.store.list_users().await?.is_empty() {
            return Ok(None);
        }
        // The desktop image when it was built (it is what a newcomer wants to see), else any.
        // Of several desktop builds, the newest (by when its disk was written).
        let images = self.store.list_gallery_images().await?;
        let mut newest: Option<(std::time::SystemTime, &GalleryImage)> = None;
        for image in images.iter().filter(|i| i.offer_name == "desktop") {
            let (disk, _) = self.store.gallery_image_files(&image.id).await?;
            let built = std::fs::metadata(&disk).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            if newest.is_none_or(|(t, _)| built > t) {
                newest = Some((built, image));
            }
        }
        let image = newest.map(|(_, i)| i).or(images.first()).cloned().ok_or_else(|| {
            Error::Conflict("the demo needs a gallery image; build one with images/desktop/build.sh".into())
        })?;
        // A desktop under software emulation wants two vCPUs and room for X.
        let (part, vcpus, ram, disk) =
            if image.offer_name == "desktop" { ("DEMO_2C_2GB_8GB", 2, 2, 8) } else { ("DEMO_1C_1GB_2GB", 1, 1, 2) };
        let actor = Actor::system();
        let password = demo_password();
        let upn = "demo@cloudpc.example".to_string();
        let user = self
            .create_user(
                &actor,
                UserCreate {
                    odata_type: None,
                    user_principal_name: upn.clone(),
                    display_name: "Demo User".into(),
                    mail: None,
                    mail_nickname: None,
                    account_enabled: Some(true),
                    password_profile: Some(PasswordProfile {
                        password: password.clone(),
                        force_change_password_next_sign_in: None,
                    }),
                },
            )
            .await?;
        let group = self
            .create_group(
                &actor,
                GroupCreate {
                    odata_type: None,
                    display_name: "Demo".into(),
                    description: Some("Users who get a demo Cloud PC".into()),
                    mail_nickname: None,
                    security_enabled: None,
                    mail_enabled: None,
                },
            )
            .await?;
        self.add_member(&actor, &group.id.to_string(), user.id).await?;
        let sku = self
            .create_sku(
                &actor,
                SkuCreate {
                    odata_type: None,
                    sku_part_number: part.into(),
                    display_name: Some(format!("Demo Cloud PC {vcpus} vCPU, {ram} GB, {disk} GB")),
                    prepaid_units: PrepaidUnits { enabled: 5, ..Default::default() },
                    v_cpu_count: vcpus,
                    ram_in_gb: ram,
                    storage_in_gb: disk,
                },
            )
            .await?;
        let policy = self
            .create_policy(
                &actor,
                ProvisioningPolicyCreate {
                    odata_type: None,
                    display_name: "Demo".into(),
                    description: Some("Made by cloudpc server --demo".into()),
                    image_id: image.id.clone(),
                    image_display_name: None,
                    image_type: ImageType::Gallery,
                    cloud_pc_naming_template: Some("DEMO-%RAND:5%".into()),
                    enable_single_sign_on: None,
                    local_admin_enabled: Some(true),
                    provisioning_type: None,
                    domain_join_configurations: None,
                    windows_setting: None,
                    grace_period_in_hours: None,
                    time_zone: None,
                    hibernate_after_minutes: None,
                    warm_pool_size: None,
                },
            )
            .await?;
        let target = AssignmentTarget {
            odata_type: "#microsoft.graph.cloudPcManagementGroupAssignmentTarget".into(),
            group_id: group.id,
        };
        self.assign_policy(
            &actor,
            &policy.id.to_string(),
            AssignRequest { assignments: vec![AssignmentInput { id: None, target }] },
        )
        .await?;
        self.assign_user_license(
            &actor,
            &upn,
            AssignLicenseRequest {
                add_licenses: vec![AssignedLicenseInput { sku_id: sku.sku_id, disabled_plans: vec![] }],
                remove_licenses: vec![],
            },
        )
        .await?;
        Ok(Some(Demo {
            summary: format!(
                "user {upn} in group Demo, license {} ({vcpus} vCPU, {ram} GB RAM, {disk} GB disk), policy Demo on gallery image '{}'",
                sku.sku_part_number, image.display_name
            ),
            user_principal_name: upn,
            password,
        }))
    }
}
